"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (``kill``, ``timeout``, a
scheduler's preemption).

The first signal asks the run to stop after the step in progress: the trainer then saves a
checkpoint of that step (unless it has one), writes its plots and says where the checkpoint
is and how to resume. A second signal stops at once (the latest checkpoint stays as it
was). Either way the rollout engine and the reward workers are shut down, and the command
line exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(BaseException):
    """A second stop signal: the run ends at once. ``signum`` is the signal's number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class GracefulStop:
    """While in its ``with`` block, SIGINT and SIGTERM set :attr:`requested` (the first) or
    raise :class:`StopNow` (the second). Handlers are only installed from the main thread
    (elsewhere the block does nothing); the previous ones come back when the block ends."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise StopNow(signum)
        self.requested = signum

    @property
    def name(self) -> str | None:
        """The requested signal's name (``SIGTERM``), or None."""
        return None if self.requested is None else signal.Signals(self.requested).name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
