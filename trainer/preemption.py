"""The scheduler's preemption warning (SIGTERM, SIGUSR1) and the user's Ctrl-C (SIGINT), recorded from the start
of the process to its end.

Installed once per process by the entry point (`trainer.cli.launch`, before Hydra and the heavy imports), so a
warning that arrives while the model loads, the data tokenizes, an evaluation generates or the export writes
is kept rather than killing the rank: the run checks the flag where it can stop cleanly (before training,
at every step's vote, before the export) and ends with the preempted status (75). It is never uninstalled:
torchrun SIGTERMs the remaining ranks once one rank has exited 75, and rank 0 may still be writing its report.
A first Ctrl-C stops the run the same way, with the checkpoint and the command that continues it, but exits 130
(not requeued); a second one stops it at once, as Python's own KeyboardInterrupt (the last checkpoint stays).
Signal handling only: no torch, no training code.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

from trainer.contracts import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT_NOTE = (b"\nCtrl-C: the run stops where it can save (the end of this step or iteration) and prints the "
                  b"command that continues it; Ctrl-C again stops it at once\n")


class PreemptionFlag:
    """SIGTERM/SIGUSR1 and a first SIGINT set `requested`; what stops, saves and exits is up to the run."""

    def __init__(self):
        self.requested = False
        self.interrupted = False  # the request was a Ctrl-C
        self.requested_at: Optional[float] = None  # time.monotonic() of the first signal
        self._pid = os.getpid()  # a process forked from this one (a data worker) inherits the handler, silently
        self._previous = {sig: signal.getsignal(sig) for sig in (*PREEMPTION_SIGNALS, signal.SIGINT)}
        self.install()

    def install(self) -> None:
        """(Again) the handler of the three signals: a library that sets its own (`ray.init` makes SIGTERM exit
        the process) is overruled by calling this after it."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGINT, self._interrupt)

    @property
    def outcome(self) -> tuple[str, int]:
        """How a run stopped on this request says so, and its exit status."""
        return ("interrupted", INTERRUPTED_EXIT_CODE) if self.interrupted else ("preempted", PREEMPTED_EXIT_CODE)

    def restore(self) -> None:
        """The handlers from before this flag (for a flag made in a test; a run's flag stays)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested_at = time.monotonic()
        self.requested = True

    def _interrupt(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self._handle(signum, frame)
        if os.environ.get("RANK", "0") == "0" and os.getpid() == self._pid:
            os.write(2, INTERRUPT_NOTE)  # not print: the handler may have interrupted a print


_FLAG: Optional[PreemptionFlag] = None


def preemption_flag() -> PreemptionFlag:
    """This process's flag, installed on first use (the main thread must make that first call)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    return _FLAG
