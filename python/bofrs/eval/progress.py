"""A progress bar over the windows an evaluation scores (tqdm when installed)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``total`` steps; :meth:`step` after each window, :meth:`label` names the current format.
    Uses tqdm when it is installed, else prints a line to stderr every ~10 s; silent when
    ``enabled`` is false."""

    def __init__(self, total: int, enabled: bool, desc: str = "bofrs eval") -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._label, self._last, self._start = "", 0.0, time.monotonic()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                return
            self._bar = tqdm(total=total, desc=desc, unit="window", dynamic_ncols=True)

    def label(self, text: str) -> None:
        """Shows ``text`` (the format being scored) beside the bar."""
        self._label = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def step(self) -> None:
        """One window done."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and (time.monotonic() - self._last > 10 or self.done == self.total):
            self._last = time.monotonic()
            elapsed = self._last - self._start
            print(f"bofrs eval: {self.done}/{self.total} windows ({self._label}), {elapsed:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Ends the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
