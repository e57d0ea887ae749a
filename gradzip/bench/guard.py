"""Cleanup of the emulated clusters on every exit Python sees: ``with`` (normal or exception), SIGINT, SIGTERM
and SIGHUP (the handler removes every live cluster, then behaves as the handler it replaced) and ``atexit``.
Only SIGKILL (or a crash of the interpreter) leaves namespaces behind, which ``gradzip bench --cleanup``
deletes."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Removable(Protocol):
    """What the guard needs of a cluster."""

    owner: int
    """The pid of the process that created it: only that process removes it."""

    @property
    def namespaces(self) -> list[str]: ...

    def close(self) -> None: ...


class CleanupGuard:
    """The live clusters of this process, and the handlers that remove them.

    Only the process that created a cluster removes it: a forked child inherits this object and the handlers,
    and must not tear down its parent's network. Setup and teardown must not be cut in half by our own
    handler (an ``ip netns add`` finishing after the handler removed the namespaces would recreate one), so a
    signal arriving meanwhile waits for them to finish (:meth:`deferring_signals`).
    """

    def __init__(self) -> None:
        self.live: dict[int, Removable] = {}
        self._saved: dict[int, Any] = {}
        self._atexit_registered = False
        self._critical_depth = 0
        self._pending: list[tuple[int, Any]] = []  # (signal, the handler it replaced)

    def close_all(self) -> None:
        from gradzip.bench.iproute import ClusterError

        for cluster in list(self.live.values()):
            if cluster.owner != os.getpid():
                continue
            try:
                cluster.close()
            except ClusterError as exc:
                print(f"gradzip: {exc}", file=sys.stderr)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Looked up now: by the time a deferred signal is handed on, the last close() has restored the handlers.
        previous = self._saved.get(signum, signal.SIG_DFL)
        if self._critical_depth:
            self._pending.append((signum, previous))
            return
        self._hand_on(signum, frame, previous)

    def _hand_on(self, signum: int, frame: FrameType | None, previous: Any) -> None:
        """Remove every live cluster, then do what the replaced handler would have done."""
        self.close_all()
        if previous is signal.SIG_IGN:
            return
        if callable(previous):  # e.g. Python's default for SIGINT: raise KeyboardInterrupt
            previous(signum, frame)
            return
        # The default action (terminate): restore it and re-raise, so the exit status still says "killed by".
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @contextmanager
    def deferring_signals(self) -> Iterator[None]:
        # Handlers run in the main thread only, so only its own setup or teardown can be cut short by them.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
            if not self._critical_depth and self._pending:
                signum, previous = self._pending[0]
                self._pending.clear()
                self._hand_on(signum, None, previous)

    def register(self, cluster: Removable) -> None:
        self.live[id(cluster)] = cluster
        if not self._atexit_registered:
            atexit.register(self.close_all)
            self._atexit_registered = True
        # Python only lets the main thread install handlers; elsewhere `with` and atexit still clean up.
        if threading.current_thread() is threading.main_thread() and not self._saved:
            for sig in _SIGNALS:
                previous = signal.getsignal(sig)
                if previous is None:  # installed outside Python: we could not hand the signal back to it
                    continue
                if previous is signal.SIG_IGN:  # e.g. SIGHUP under nohup: ignored it is, and stays
                    continue
                self._saved[sig] = previous
                signal.signal(sig, self.on_signal)

    def unregister(self, cluster: Removable) -> None:
        self.live.pop(id(cluster), None)
        if self.live or threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._saved.items():
            if signal.getsignal(sig) == self.on_signal:  # a bound method: equal, never identical
                signal.signal(sig, previous)
        self._saved.clear()


GUARD = CleanupGuard()
"""The one guard of this process."""
