"""A progress bar: tqdm when it is installed, else a small one that prints a line now and then."""

from __future__ import annotations

import sys
import time

__all__ = ["progress_bar"]


class _LineProgress:
    """Enough of tqdm's interface for the training loop: a line at most every ``interval`` s."""

    def __init__(self, total: int, desc: str, disable: bool, interval: float = 5.0):
        self.total, self.desc, self.disable, self.interval = total, desc, disable, interval
        self.n, self.postfix = 0, ""
        self._start = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and n and (now - self._last >= self.interval or self.n >= self.total):
            self._last = now
            rate = self.n / max(now - self._start, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} [{now - self._start:.0f}s, {rate:.2f} it/s] {self.postfix}",
                  file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str = "", disable: bool = False):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineProgress(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
