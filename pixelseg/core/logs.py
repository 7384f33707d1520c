"""Logging through the standard ``logging`` module, written with ``tqdm.write`` so progress bars stay intact.

Messages go to the "pixelseg" logger (stderr, INFO and up; warnings prefixed "warning:"); a
training run adds its ``train.log`` file for the run's duration (rank 0 only; other ranks show
warnings only). Set ``logging.getLogger("pixelseg").propagate = True`` to route them elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("pixelseg")


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


class TqdmHandler(logging.Handler):
    """Writes above any live tqdm bar, to the sys.stderr of the moment (so capture and redirects work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def _install() -> None:
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(_ConsoleFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_install()


@contextlib.contextmanager
def run_log(run_dir: Path | None, is_main: bool = True):
    """For one training run: append to ``run_dir/train.log`` (rank 0), keep other ranks to warnings."""
    handler, level = None, logger.level
    if is_main and run_dir is not None:
        handler = logging.FileHandler(Path(run_dir) / "train.log", mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    elif not is_main:
        logger.setLevel(logging.WARNING)
    try:
        yield logger
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
