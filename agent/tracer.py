"""The tracer thread: every ptrace request for a tracee runs on the one thread that seized it.

Linux ties a tracee to the thread that attached, so a ``Tracer`` owns one dedicated thread
and runs submitted functions there in order. Blocking callers use ``call``; trio code awaits
``acall``. Memory moves in bulk elsewhere (process_vm_readv, /proc/PID/mem): only
ptrace requests and injected system calls need this thread.
"""
from __future__ import annotations

import queue
import signal
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_STOP = object()
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}   # what asks a process to stop


def stop_signal_pending() -> bool:
    """Whether a signal asking the tool to stop was sent and no thread has taken it yet. From
    the tracer thread (which blocks them) it sees one the main thread has not run for: on a
    busy machine the operation could otherwise pass its point of no return before the main
    thread runs its handler and sets the operation's cancel event, and report success for a
    command interrupted before that point."""
    return bool(STOP_SIGNALS & signal.sigpending())


class Tracer:
    def __init__(self, name: str = "kcr-tracer") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _loop(self) -> None:
        # A signal asking the tool to stop goes to a thread that does not block it. Taken by
        # this thread (blocked in a write, say), it would run its handler only once the
        # thread waiting in ``call`` woke for another reason: after the operation it was to
        # interrupt. So this thread, and the threads it starts (an image's writers), leave
        # them to the others.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # delivered to the caller
                fut.set_exception(exc)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("tracer is closed")
        fut: Future[T] = Future()
        self._queue.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, on_interrupt: threading.Event | None = None,
             **kwargs: Any) -> T:
        """Run ``fn`` on the tracer thread and wait for it.

        A KeyboardInterrupt while waiting does not abandon the tracee (a tracer that exits
        mid-injection would leave it with borrowed registers): it sets ``on_interrupt``, which the
        operation checks at safe points to roll back, and keeps waiting for it to finish."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        fut = self.submit(fn, *args, **kwargs)
        while True:
            try:
                result = fut.result()
                break
            except KeyboardInterrupt:
                if on_interrupt is not None:
                    on_interrupt.set()
        return result

    async def acall(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import trio

        # Woken by the tracer thread itself when done (no worker thread waiting on the future:
        # one thread hop less per call, which counts inside the downtime).
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut = self.submit(fn, *args, **kwargs)
        fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
        # The request itself cannot be interrupted halfway (a tracee mid-injection must be
        # put back), so waiting is shielded; cancellation takes effect once it returns.
        with trio.CancelScope(shield=True):
            await done.wait()
        return fut.result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
