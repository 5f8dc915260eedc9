"""Routers of a fleet: which GPU (replica) serves each request. One implementation for
the fleet twin (`twin.fleet`) and for replay against several real servers
(`replay.fleet_target`), so both send the same request to the same replica by the
same rule.

A router reads what it may know about the replicas through `ReplicaState`:
- `outstanding(r)`: requests routed to replica r that have not finished (sent and not
  answered in full). The twin counts requests whose last token came at or before the
  routing instant; a real router counts from its own bookkeeping (+1 when it sends,
  -1 when the stream ends), which is the same quantity.
- `holds(r, adapter)`: whether replica r's GPU adapter slots hold the adapter. The twin
  reads its engine's slots; a real router cannot see them and keeps its own record (see
  `replay.fleet_target`).

Routers (`ROUTERS`):
- `placement`: among the GPUs the plan lists for the adapter, the one with the fewest
  outstanding requests. Base-model requests go to the GPUs that list the base model
  (`null`), else to any GPU.
- `round-robin`: every GPU in turn, whatever the adapter.
- `least-loaded`: the GPU with the fewest outstanding requests.
- `adapter-affinity`: among the GPUs whose slots hold the adapter, the least loaded;
  when none holds it, the least loaded of all.
Ties go to the first GPU at or after a pointer that moves past each choice, so an idle
fleet is served in turn rather than piling onto GPU 0. There is one pointer per set of
candidate GPUs, so a decision depends only on the GPUs it chooses among: GPUs that share
no adapter can be simulated apart and give the same routing.

A router is *static* for a plan when it never reads the state: round-robin always, and
placement when every adapter the trace uses sits on one GPU. Then the routing of the
whole trace is known up front (`route_static`) and the GPUs run as independent
simulations. Otherwise the GPUs are coupled: the router must see their state as each
request arrives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from tracekit.schema import TracekitError

ROUTERS = ("placement", "round-robin", "least-loaded", "adapter-affinity")


class ReplicaState(Protocol):
    def outstanding(self, replica: int) -> int: ...

    def holds(self, replica: int, adapter: str | None) -> bool: ...


class Router:
    """Route requests one at a time (`route`) or, when static, a whole trace at once."""

    def __init__(self, name: str, num_replicas: int, placement: Mapping[str | None, Sequence[int]]):
        if name not in ROUTERS:
            raise TracekitError(f"--router {name}: expected one of {', '.join(ROUTERS)}")
        if num_replicas < 1:
            raise TracekitError("a fleet needs at least one GPU")
        self.name = name
        self.num_replicas = num_replicas
        self.all = list(range(num_replicas))
        self.placement = {a: sorted(set(g)) for a, g in placement.items()}
        self._next = 0  # round-robin pointer
        self._tie: dict[tuple[int, ...], int] = {}  # tie-break pointer per candidate set

    def candidates(self, adapter: str | None) -> list[int]:
        if self.name != "placement":
            return self.all
        gpus = self.placement.get(adapter)
        if gpus:
            return gpus
        if adapter is None:
            return self.all
        raise TracekitError(f"adapter {adapter!r} is on no GPU of the plan")

    def is_static(self, adapters: Sequence[str | None]) -> bool:
        """Whether routing `adapters` (those the trace uses) never reads the state."""
        if self.name == "round-robin" or self.num_replicas == 1:
            return True
        if self.name == "placement":
            return all(len(self.candidates(a)) == 1 for a in adapters)
        return False

    def _least(self, cands: Sequence[int], state: ReplicaState, pointer: tuple[int, ...]) -> int:
        n = self.num_replicas
        start = self._tie.get(pointer, pointer[0])
        best, best_key = -1, None
        for r in cands:
            key = (state.outstanding(r), (r - start) % n)
            if best_key is None or key < best_key:
                best, best_key = r, key
        self._tie[pointer] = (best + 1) % n
        return best

    def route(self, adapter: str | None, state: ReplicaState) -> int:
        """The replica for one request of `adapter`, given the replicas' state now."""
        if self.name == "round-robin":
            r = self._next
            self._next = (r + 1) % self.num_replicas
            return r
        cands = self.candidates(adapter)
        if len(cands) == 1:
            return cands[0]
        pointer = tuple(cands)
        if self.name == "adapter-affinity":
            holding = [r for r in cands if state.holds(r, adapter)]
            if holding:
                return self._least(holding, state, pointer)
        return self._least(cands, state, pointer)

    def components(self, adapters: Sequence[str | None]) -> list[list[int]]:
        """GPUs that must be simulated together: those some request may be sent to
        together (placement: linked by an adapter on several GPUs; a router that reads
        the state of every GPU links them all). Round-robin never reads the state."""
        n = self.num_replicas
        if self.name == "round-robin":
            return [[g] for g in range(n)]
        parent = list(range(n))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a in adapters:
            c = self.candidates(a)
            for g in c[1:]:
                parent[find(g)] = find(c[0])
        groups: dict[int, list[int]] = {}
        for g in range(n):
            groups.setdefault(find(g), []).append(g)
        return sorted(groups.values())

    def route_static(self, adapter_codes: np.ndarray, names: Sequence[str | None], shared: int | None = None) -> np.ndarray:
        """Replica per request for a static router: `adapter_codes[i]` indexes `names`
        (requests in arrival order). Same answer as calling `route` request by request.
        `shared`: the placement is not static, and requests of an adapter on several GPUs
        get this value (the rest are routed as ever)."""
        n = len(adapter_codes)
        if self.name == "round-robin":
            out = (np.arange(n, dtype=np.int64) + self._next) % self.num_replicas
            if n:
                self._next = int(out[-1] + 1) % self.num_replicas
            return out
        table = np.empty(len(names), dtype=np.int64)
        for k, a in enumerate(names):
            cands = self.candidates(a)
            if len(cands) == 1:
                table[k] = cands[0]
            elif shared is None:
                raise ValueError(f"router {self.name} is not static for adapter {a!r}")
            else:
                table[k] = shared
        return table[adapter_codes] if n else np.zeros(0, dtype=np.int64)
