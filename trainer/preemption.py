"""The scheduler's preemption warning (SIGTERM, SIGUSR1), recorded from the start of the process to its end.

Installed once per process by the entry point (`trainer.cli.launch`, before Hydra and the heavy imports), so a
warning that arrives while the model loads, the data tokenizes, an evaluation generates or the export writes
is kept rather than killing the rank: the run checks the flag where it can stop cleanly (before training,
at every step's vote, before the export) and ends with the preempted status (75). It is never uninstalled:
torchrun SIGTERMs the remaining ranks once one rank has exited 75, and rank 0 may still be writing its report.
Signal handling only: no torch, no training code.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """SIGTERM/SIGUSR1 set `requested`; what stops, saves and exits is up to the run."""

    def __init__(self):
        self.requested = False
        self.requested_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
        self.install()

    def install(self) -> None:
        """(Again) the handler of both signals: a library that sets its own (`ray.init` makes SIGTERM exit the
        process) is overruled by calling this after it."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers from before this flag (for a flag made in a test; a run's flag stays)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested_at = time.monotonic()
        self.requested = True


_FLAG: Optional[PreemptionFlag] = None


def preemption_flag() -> PreemptionFlag:
    """This process's flag, installed on first use (the main thread must make that first call)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    return _FLAG
