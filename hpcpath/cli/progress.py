"""A one-line terminal progress display fed by the tiling stage's events."""

from __future__ import annotations

import sys
import time

import click


class Progress:
    """Redraws one status line on a terminal; prints a line every few seconds otherwise
    (batch logs under sbatch stay readable)."""

    def __init__(self, stream=None, interval: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.2
        self.t0 = self.last = time.perf_counter()
        self.slides = self.done = self.tiles_total = self.tiles_done = 0

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "start":
            self.slides = info["slides"]
        elif kind == "plan":
            self.tiles_total += info["n_tiles"]
        elif kind == "tiles":
            self.tiles_done += info["n"]
        elif kind == "slide":
            self.done += 1
            rec = info["record"]
            if rec.status == "failed":
                self._line(f"hpcpath: {rec.source}: {rec.error}")
            elif rec.status == "empty":
                self._line(f"hpcpath: warning: {rec.source}: {rec.error}")
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._status()

    def _text(self) -> str:
        secs = time.perf_counter() - self.t0
        rate = self.tiles_done / max(secs, 1e-9)
        return (
            f"[tile] slides {self.done}/{self.slides}  tiles {self.tiles_done}/{self.tiles_total}"
            f"  {rate:,.0f} tiles/s  {secs:,.0f}s"
        )

    def _status(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self._text())
            self.stream.flush()
        else:
            click.echo(self._text(), file=self.stream)

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        click.echo(text, file=self.stream)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        click.echo(self._text(), file=self.stream)
