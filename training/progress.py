"""Progress output: a rich progress bar in a terminal, plain periodic log lines elsewhere
(Slurm logs, kubectl logs), so cluster logs stay greppable."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dreamfleet.progress")


class Progress:
    def __init__(self, rank: int, enabled: bool | None = None):
        self.rank = rank
        self.interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._task = None
        self._subject = ""
        self._started = 0.0

    def start_subject(self, subject_id: str, steps: int, start_step: int = 0) -> None:
        self._subject = subject_id
        self._started = time.perf_counter()
        self._start_step = start_step
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(f"rank {self.rank} {subject_id}", total=steps, completed=start_step, loss="-")
        log.info("rank %d subject %s: training %d steps (from step %d)", self.rank, subject_id, steps, start_step)

    def step(self, step: int, steps: int, loss: float | None) -> None:
        if self._bar is not None:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self._bar.update(self._task, completed=step, **fields)
        elif loss is not None:
            rate = (step - self._start_step) / max(time.perf_counter() - self._started, 1e-9)
            log.info("rank %d subject %s step %d/%d loss %.5f %.2f steps/s", self.rank, self._subject, step, steps, loss, rate)

    def end_subject(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
