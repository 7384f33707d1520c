"""Progress bars that suit both a terminal and a log file.

On a terminal: an ordinary tqdm bar. Redirected (a log file, CI, nohup): tqdm's redrawn bar would
either vanish (tqdm's disable=None) or fill the file with carriage returns, so the same bar is
written as a plain line at most every `every_s` seconds, plus a final line - a long epoch or a
full-resolution evaluation is never silent for minutes, and a log stays readable.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_EVERY_S = 30.0


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into separate lines."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, s: str) -> None:
        for line in s.replace("\r", "\n").split("\n"):
            line = line.strip()
            state = line.split("[")[0].replace("#", "").replace(" ", "")  # count, not the rate or bar width
            if line and state != self.last:  # closing repeats the last state
                self.stream.write(line + "\n")
                self.last = state

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable=None,
    *,
    total=None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    every_s: float = LOG_EVERY_S,
    stream=None,
    **kwargs,
) -> tqdm:
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, **kwargs)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        leave=True,
        ascii=True,
        mininterval=every_s,
        maxinterval=every_s,
        ncols=100,
        **kwargs,
    )
