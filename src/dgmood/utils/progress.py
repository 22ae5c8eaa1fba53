"""Progress of a long stage: a live bar on a terminal, one summary line per stage in a log.

A run whose stderr is a terminal gets tqdm's bar; a run whose stderr is a file or a pipe (``nohup``, CI, a job
scheduler) gets, when the stage ends, one line ``DESC: N UNIT in T s (R UNIT/s)`` instead of hundreds of redrawn
bars.
"""

from __future__ import annotations

import sys
import time

__all__ = ["LogLine", "progress_bar"]


class LogLine:
    """The tqdm calls dgmood makes (``update``, ``set_postfix``, ``close``, context manager), written as one line
    at ``close``."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.start, self.postfix, self.closed = stream or sys.stderr, time.perf_counter(), "", False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(args[0] if args else {}), **kwargs}.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        rate = f" ({self.n / seconds:,.0f} {self.unit}/s)" if seconds > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n:,} {self.unit} in {seconds:.1f} s{rate}{extra}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        raise TypeError("LogLine wraps no iterable; use progress_bar(iterable=...)")


class _LoggedIterable(LogLine):
    def __init__(self, iterable, **kwargs):
        super().__init__(**kwargs)
        self.iterable = iterable

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 enabled: bool = True):
    """tqdm's bar when ``enabled`` and stderr is a terminal; a :class:`LogLine` when enabled and it is not; a
    disabled tqdm (nothing printed) when not ``enabled``."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        if iterable is not None:
            return _LoggedIterable(iterable, total=total, desc=desc, unit=unit, initial=initial)
        return LogLine(total, desc, unit, initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled)
