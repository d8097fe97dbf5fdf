"""Progress bars on the waits a user watches (training steps, evaluation, the reference pass, PPO's iterations
and evaluations): rate and ETA in a terminal, and in a log file (not a TTY) a plain line every few percent
instead of a carriage-return update per step. Rank 0 only: the caller says whether this process shows one."""

from __future__ import annotations

import math
import sys
from typing import Iterable, Optional, TextIO

from tqdm import tqdm

LOG_PERCENT = 5  # in a log, a line each time this much more of the total is done
DELAY_S = 3.0  # a wait shorter than this shows no bar at all


class _LogLines:
    """A file for tqdm that turns its in-place updates ('\\r' + bar + padding) into one line each."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int], desc: str, enabled: bool = True,
             unit: str = "it", initial: int = 0, stream: Optional[TextIO] = None) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand) on `stream` (stderr), silent when not `enabled`."""
    stream = stream or sys.stderr
    common = dict(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, delay=DELAY_S)
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    every = max(1, math.ceil((total or 0) * LOG_PERCENT / 100))
    # maxinterval=inf: tqdm's monitor thread would otherwise drop miniters to 1 after 10 s without a line.
    return tqdm(iterable, file=_LogLines(stream), ascii=True, ncols=100, miniters=every, mininterval=1.0,
                maxinterval=math.inf, **common)
