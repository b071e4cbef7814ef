"""Stopping a run cleanly on SIGTERM and SIGINT (preemption, Ctrl-C, `timeout`).

While a run trains, the handlers only record the signal. The loop looks at it after each
update, writes a resumable checkpoint of where it stands and summary.json, and the command
exits 128 + the signal's number (143 for SIGTERM, 130 for SIGINT: what schedulers and shells
expect). A second signal while the checkpoint is written is recorded and changes nothing, so no
write is cut half-way (and every write is atomic anyway: even SIGKILL leaves the previous file).
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_STOPS = tuple(s.name for s in SIGNALS)  # the stop_reason of a signalled run


def exit_status(stop_reason: str | None) -> int | None:
    """128 + the signal's number for a run stopped by a signal (143, 130); None otherwise."""
    if stop_reason in SIGNAL_STOPS:
        return 128 + signal.Signals[stop_reason].value
    return None


class StopSignals:
    """Inside `with StopSignals():` SIGTERM and SIGINT are recorded in `received` (the first
    one's number, 0 for none), not acted on; leaving restores the previous handlers. Outside the
    main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self, announce: bool = True):
        self.received = 0
        self.ignored = 0
        self.announce = announce  # rank 0 says what happens; the other ranks stay quiet
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            self.ignored += 1
            note = "already stopping: ignored until the checkpoint is written\n"
        else:
            self.received = signum
            note = "stopping after this update: writing a checkpoint and summary.json\n"
        if self.announce:
            # os.write, not print: a handler that prints while the main thread is inside a
            # print to the same stream raises "reentrant call"
            os.write(2, f"resvae: {signal.Signals(signum).name}: {note}".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        # A signal taken here may have come too late to stop anything (during a run's last
        # update or its final test): an enclosing StopSignals (a sweep's) still has to know.
        outer = getattr(self._previous.get(self.received), "__self__", None)
        if self.received and isinstance(outer, StopSignals) and not outer.received:
            outer.received = self.received
        self._previous.clear()


class SweepSignals(StopSignals):
    """A sweep's: SIGTERM / SIGINT between runs stop it at once (KeyboardInterrupt); one taken
    by a run's own StopSignals is passed up when that run ends, and the sweep stops after it.
    `received` says which, for the exit status."""

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum
        raise KeyboardInterrupt(signal.Signals(signum).name)


__all__ = ["StopSignals", "SweepSignals", "SIGNAL_STOPS", "exit_status"]
