"""Independent tasks on local processes or a Ray cluster, one implementation for every
package that fans work out (the predictor's twin sweeps, the fleet twin's per-GPU runs).

`run_tasks(fn, tasks, executor=..., jobs=...)` yields `(index, result)` as tasks finish.
`fn` must be importable by name (`module:function` of a package), because workers are
fresh processes: `spawn`, not `fork` (forking a process whose polars thread pool runs can
deadlock the child), or Ray workers.

Each worker runs single-threaded (polars, BLAS): N workers with N threads each
oversubscribe the cores (measured: 2 workers ran slower than 1 on 2 cores).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tracekit.schema import TracekitError

EXECUTORS = ("local", "ray")
SINGLE_THREAD_ENV = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def check_reachable(address: str, flag: str = "--ray-address") -> None:
    """Fail in seconds, not minutes (ray.init retries a dead address for a long time)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise TracekitError(f"{flag} {address}: cannot connect: {e}") from None


def iter_local(fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], jobs: int) -> Iterator[tuple[int, Any]]:
    """`fn(*task)` for each task: in this process when jobs <= 1, else in `jobs` spawned
    single-threaded worker processes. Yields (task index, result) as they finish."""
    if jobs <= 1 or len(tasks) <= 1:
        for i, t in enumerate(tasks):
            yield i, fn(*t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # The workers inherit the environment at start: set it only while they start.
    saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        ex = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("spawn"))
        futs = {ex.submit(fn, *t): i for i, t in enumerate(tasks)}  # workers start here
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with ex:
        try:
            for f in as_completed(futs):
                yield futs[f], f.result()
        finally:
            for f in futs:
                f.cancel()


def iter_ray(
    fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], jobs: int, address: str | None, flag: str = "--ray-address"
) -> Iterator[tuple[int, Any]]:
    """`fn(*task)` on Ray: an existing cluster at `address`, or a local one of `jobs` CPUs
    started (and shut down) here. Yields (task index, result) as they finish."""
    try:
        import ray
    except ImportError:
        raise TracekitError("--executor ray needs Ray: pip install 'lora-tracekit[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            check_reachable(address, flag)
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = max(1, jobs)
            kwargs["runtime_env"] = {"env_vars": dict(SINGLE_THREAD_ENV)}
        try:
            ray.init(**kwargs)
        except Exception as e:  # ray raises many types for a bad address
            raise TracekitError(f"{flag} {address}: cannot connect: {str(e).splitlines()[0]}") from None
        started = True
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(*t): i for i, t in enumerate(tasks)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                yield refs[r], ray.get(r)
    finally:
        if started:
            ray.shutdown()


def run_tasks(
    fn: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    *,
    executor: str = "local",
    jobs: int = 1,
    ray_address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """`fn(*task)` for every task on `executor` ("local" or "ray"); yields (index, result)."""
    if executor == "local":
        if ray_address:
            raise TracekitError("--ray-address needs --executor ray")
        return iter_local(fn, tasks, jobs)
    if executor == "ray":
        if ray_address:
            check_reachable(ray_address)
        return iter_ray(fn, tasks, jobs, ray_address)
    raise TracekitError(f"--executor {executor}: expected local or ray")
