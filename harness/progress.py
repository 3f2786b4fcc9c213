"""Progress of a long run (`dsv3 report --full`, training, the gate over many records) as a tqdm bar on stderr.

A `Progress` counts units of work (report sections, records, training runs); calling it with a message shows what
runs now, `fraction(f)` moves the bar within the current unit, `advance()` finishes one. It is silent, and costs
nothing, when stderr is not a terminal (logs, CI) or the user asked for quiet.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

_MESSAGE_CHARS = 60  # longer messages are cut so that the bar keeps one terminal line


class Progress:
    """A progress bar over `total` units on `stream` (default stderr); a no-op when quiet or not a terminal."""

    def __init__(self, total: float, desc: str = "", quiet: bool = False, stream: TextIO | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self.enabled = not quiet and stream.isatty()
        self._done = 0.0
        self._bar = tqdm(total=total, desc=desc, file=stream, leave=False, dynamic_ncols=True,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}",
                         ) if self.enabled else None

    def __call__(self, message: str) -> None:
        """Show `message` as what runs now (the interface of ReportContext.progress)."""
        if self._bar is not None:
            cut = message if len(message) <= _MESSAGE_CHARS else message[: _MESSAGE_CHARS - 3] + "..."
            self._bar.set_postfix_str(cut)

    def fraction(self, done: float) -> None:
        """Move the bar to `done` (0..1) of the current unit, for a unit that reports its own progress."""
        if self._bar is not None:
            self._bar.n = self._done + min(max(done, 0.0), 1.0)
            self._bar.refresh()

    def advance(self, units: int = 1) -> None:
        """Finish `units` units."""
        self._done += units
        if self._bar is not None:
            self._bar.n = self._done
            self._bar.refresh()

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def notify(message: str, quiet: bool = False) -> None:
    """A line for the user on stderr that is not progress (what was written where), unless quiet."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
