"""Progress that a person can read: tqdm's bar on a terminal, a plain line every so often in a log file."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

__all__ = ["PlainProgress", "progress"]

log = logging.getLogger("jc2a.progress")
EVERY = float(os.environ.get("JC2A_PROGRESS_SECONDS", "30"))  # seconds between plain progress lines


class PlainProgress:
    """tqdm's interface (update, set_postfix, close, n, total) written as one log line every `every` seconds and
    at the end, for SLURM logs and CI, where carriage-return bars fill files with refreshes."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 every: float = EVERY) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.n, self.every = total, desc, unit, initial, every
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        tail = f" ({self.postfix})" if self.postfix else ""
        log.info("%s: %d%s %s, %.2f %s/s%s", self.desc or "progress", self.n, of, self.unit, rate, self.unit, tail)

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic())


def progress(total: Optional[int] = None, desc: str = "", unit: str = "it", disable: bool = False, initial: int = 0,
             leave: bool = True):  # fmt: skip
    """tqdm's bar when stderr is a terminal, else `PlainProgress` (a line every `JC2A_PROGRESS_SECONDS`, 30 s);
    nothing at all with `disable`."""
    if disable:
        from tqdm import tqdm

        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return PlainProgress(total, desc, unit, initial)
