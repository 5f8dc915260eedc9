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

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tracekit.schema import TracekitError

EXECUTORS = ("local", "ray")
SINGLE_THREAD_ENV = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def single_thread_env() -> Iterator[None]:
    """SINGLE_THREAD_ENV set in this process while worker processes start (they inherit
    it), the caller's own values back afterwards."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    with Pool("local", jobs) as pool:
        yield from pool.run(fn, tasks)


def iter_ray(fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], jobs: int, address: str | None) -> Iterator[tuple[int, Any]]:
    """`fn(*task)` on Ray: an existing cluster at `address`, or a local one of `jobs` CPUs
    started (and shut down) here. Yields (task index, result) as they finish."""
    with Pool("ray", jobs, address) as pool:
        yield from pool.run(fn, tasks)


class Pool:
    """Workers kept across several batches of tasks (a planner checks many candidate
    plans: the workers start once). `run(fn, tasks)` yields (index, result) as tasks
    finish; with `jobs` <= 1 on "local", tasks run in this process. Several threads may
    submit to one pool."""

    def __init__(self, executor: str = "local", jobs: int = 1, ray_address: str | None = None):
        if executor not in EXECUTORS:
            raise TracekitError(f"--executor {executor}: expected local or ray")
        if executor == "local" and ray_address:
            raise TracekitError("--ray-address needs --executor ray")
        if ray_address:
            check_reachable(ray_address)
        self.executor = executor
        self.jobs = max(1, jobs)
        self.ray_address = ray_address
        self._local: Any = None
        self._ray_started = False
        self._remote: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._starting: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._helping = threading.Lock()
        self._shutdown_by_starter = False
        self._start_error: BaseException | None = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, wait: bool = True) -> None:
        """Stop the workers. `wait=False`: Ray started by this pool's starter thread is shut
        down by that thread (a second or two) while the caller goes on; `join()` waits."""
        if self._starting is not None:
            self._ready.wait()
        if self._local is not None:
            self._local.shutdown(wait=True, cancel_futures=True)
            self._local = None
        if self._ray_started:
            if not wait and self._starting is not None and self._starting.is_alive():
                self._shutdown_by_starter = True
            else:
                import ray

                ray.shutdown()
            self._ray_started = False
        self._stop.set()
        if wait:
            self.join()

    def join(self) -> None:
        if self._starting is not None:
            self._starting.join()

    def start(self, warm: Sequence[str] = (), wait: bool = False) -> None:
        """Start the workers now, in the background (spawned processes, or Ray and its
        workers), each importing the modules `warm`, so that their start-up overlaps the
        caller's own work (`wait`: until one of them is up). `run(..., help=True)` calls it."""
        if self.executor == "local" and self.jobs <= 1:
            return
        with self._lock:
            if self._starting is None:
                self._starting = threading.Thread(target=self._start, args=(tuple(warm),), daemon=True)
                self._starting.start()
        if wait:
            self._ready.wait()
            if self._start_error is not None:
                raise self._start_error

    def _start(self, warm: tuple[str, ...]) -> None:
        try:
            if self.executor == "local":
                from concurrent.futures import FIRST_COMPLETED, wait

                ex = self._executor()
                with self._lock, single_thread_env():
                    futs = [ex.submit(import_modules, warm) for _ in range(self.jobs)]
                wait(futs, return_when=FIRST_COMPLETED)
            else:
                import ray

                remote = self._ray_remote(import_modules)
                ray.wait([remote.remote(warm) for _ in range(self.jobs)], num_returns=1)
        except BaseException as e:  # raised where the tasks are collected
            self._start_error = e
        finally:
            self._ready.set()
        if self.executor == "ray":
            # Ray's processes die with the thread that started them (PR_SET_PDEATHSIG
            # follows the thread): this one lives until the pool closes.
            self._stop.wait()
            if self._shutdown_by_starter:
                import ray

                ray.shutdown()

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], help: bool = False,
            warm: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
        """`fn(*task)` for each task; yields (index, result) as they finish. `help`: while
        the workers are still starting (spawn, imports; Ray's start-up takes seconds), the
        calling thread runs tasks itself, in order, and the workers take the rest once
        one of them is up (`warm`: the modules they import first)."""
        if self.executor == "local" and (self.jobs <= 1 or len(tasks) <= 1):
            return ((i, fn(*t)) for i, t in enumerate(tasks))
        # One thread helps at a time: two would share this process's one interpreter lock.
        if help and not self._ready.is_set() and len(tasks) > 1 and self._helping.acquire(blocking=False):
            return self._run_helping(fn, tasks, warm)
        return self._run_backend(fn, tasks)

    def _run_backend(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        if self._starting is not None:
            self._ready.wait()
            if self._start_error is not None:
                raise self._start_error
        return self._run_ray(fn, tasks) if self.executor == "ray" else self._run_local(fn, tasks)

    def _run_helping(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
                     warm: Sequence[str]) -> Iterator[tuple[int, Any]]:
        import queue
        from collections import deque

        self.start(warm)
        todo = deque(range(len(tasks)))
        claim = threading.Lock()
        results: queue.Queue[tuple[str, Any]] = queue.Queue()

        def feed() -> None:
            # Once a worker is up, every task not yet claimed here goes to the workers.
            self._ready.wait()
            with claim:
                idx = list(todo)
                todo.clear()
            try:
                if idx:
                    for j, out in self._run_backend(fn, [tasks[i] for i in idx]):
                        results.put(("ok", (idx[j], out)))
            except BaseException as e:
                results.put(("error", e))
            results.put(("done", None))

        threading.Thread(target=feed, daemon=True).start()
        try:
            while True:
                with claim:
                    i = todo.popleft() if todo and not self._ready.is_set() else None
                if i is None:
                    break
                yield i, fn(*tasks[i])
        finally:
            self._helping.release()
        while True:
            kind, v = results.get()
            if kind == "ok":
                yield v
            elif kind == "error":
                raise v
            else:
                break

    def _executor(self) -> Any:
        with self._lock:
            if self._local is None:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                self._local = ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"))
            return self._local

    def _run_local(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        from concurrent.futures import as_completed

        ex = self._executor()
        with self._lock:
            # The workers inherit the environment when they start (at the first submit).
            with single_thread_env():
                futs = {ex.submit(fn, *t): i for i, t in enumerate(tasks)}
        try:
            for f in as_completed(futs):
                yield futs[f], f.result()
        finally:
            for f in futs:
                f.cancel()

    def _ray_remote(self, fn: Callable[..., Any]) -> Any:
        """Ray started or joined (once), and `fn` as a remote function of one CPU."""
        try:
            import ray
        except ImportError:
            raise TracekitError("--executor ray needs Ray: pip install 'lora-tracekit[ray]'") from None
        with self._lock:
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
                if self.ray_address:
                    kwargs["address"] = self.ray_address
                else:
                    kwargs["num_cpus"] = self.jobs
                try:
                    # A local cluster's workers inherit the environment its processes start
                    # with: single-threaded, as local workers (a runtime_env would do the
                    # same through Ray's runtime-env agent: 5 s more to start, measured).
                    with single_thread_env():
                        ray.init(**kwargs)
                except Exception as e:  # ray raises many types for a bad address
                    raise TracekitError(f"--ray-address {self.ray_address}: cannot connect: {str(e).splitlines()[0]}") from None
                self._ray_started = True
            remote = self._remote.get(fn)
            if remote is None:
                remote = self._remote[fn] = ray.remote(num_cpus=1)(fn)
        return remote

    def _run_ray(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        import ray

        remote = self._ray_remote(fn)
        refs = {remote.remote(*t): i for i, t in enumerate(tasks)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                yield refs[r], ray.get(r)


def import_modules(names: Sequence[str]) -> int:
    """A worker's first task: import what the real tasks need (its pid back)."""
    import importlib

    for n in names:
        importlib.import_module(n)
    return os.getpid()


def run_tasks(
    fn: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    *,
    executor: str = "local",
    jobs: int = 1,
    ray_address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """`fn(*task)` for every task on `executor` ("local" or "ray"); yields (index, result)."""
    with Pool(executor, jobs, ray_address) as pool:
        yield from pool.run(fn, tasks)
