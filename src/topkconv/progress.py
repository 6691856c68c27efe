"""Progress of long work: a bar on a terminal, a line per step in a log, nothing when switched off.

A tqdm bar written to a file is a stream of carriage returns that a log viewer shows as one growing line (or
not at all until it ends); a line per finished step, with the elapsed time, is what a log needs."""

from __future__ import annotations

import sys
import time


class Progress:
    """``step(label)`` after each of ``total`` steps; ``say(message)`` for a stage between them (``total`` 0:
    stages only, no bar)."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True):
        from tqdm import tqdm

        self.desc, self.total, self.done, self.enabled = desc, total, 0, enabled
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not (self.terminal and total))
        self.started = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.terminal:
            self.bar.set_postfix_str(label)
            self.bar.update()
        elif self.enabled:
            self.say(f"{label} ({self.done}/{self.total})")

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{self.desc}: {message}, {time.perf_counter() - self.started:.0f} s"
        if self.terminal:
            self.bar.write(line, file=sys.stderr)  # above the bar, which stays
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
