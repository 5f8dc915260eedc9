"""Stop signals in the EngineCore: flush the moment one arrives, and hold a late one
while the last steps are written. Nothing here imports vLLM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tracekit.capture.steps import StepRecorder


def flush_on_signal(recorder: StepRecorder) -> None:
    """Start writing the buffered rows the moment SIGTERM/SIGINT reaches the process, in
    a thread (a signal handler must not wait for the writer's lock), instead of at the
    engine loop's next turn, which the process manager's SIGKILL may pre-empt. The
    handler installed before (vLLM's own) runs as before; with none, nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue  # default or ignored: not vLLM's EngineCore, leave it alone

        def handler(signum: int, frame: Any, prev: Callable[..., Any] = prev) -> None:
            recorder.hurry()
            prev(signum, frame)

        signal.signal(sig, handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block is done, then deliver them as they would have
    been. The EngineCore resets both to the default action before its teardown, and the
    process manager's own SIGTERM often lands there, a moment after the one that started
    the shutdown: it would kill the process in the middle of writing the last steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGTERM, signal.SIGINT)
    prev = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(got):
            signal.raise_signal(sig)
