"""Progress bars that suit where the output goes: a live bar on a terminal, a few lines in a log.

On a terminal, tqdm redraws its bar in place. Redirected into a file (a
SLURM job's ``.out``, a captured log), every redraw would be one more update
written, a carriage return per image; there ``progress`` writes the stage's
status as a line when it starts, at most every ``LOG_INTERVAL`` seconds, and
when it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between status lines in a log


class _Lines:
    """A stream for tqdm that writes each status as a line of its own (no carriage returns, no blank redraws)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; in a log, a line at start, every 10 s and at the end."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ncols=100, ascii=True, **kwargs)
