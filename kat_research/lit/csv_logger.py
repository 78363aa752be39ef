"""Lightning's CSV logger, continued across resumes: one run, one ``metrics.csv``.

Lightning deletes an existing ``metrics.csv`` when its logger starts, so a resumed run would lose
the rows of the steps before its checkpoint. This logger keeps them and appends; the caller
first drops the rows of the steps the resumed run logs again
(:func:`kat_research.training.folder.trim_metrics`). When a new column appears Lightning
rewrites the file in place, so a kill during the rewrite lost every row after the cut; here the
rewrite goes to a temporary file that replaces the old one whole.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuedWriter(ExperimentWriter):
    """An experiment writer that continues an existing metrics file (its columns included)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        tmp = os.path.join(self.log_dir, f".{os.path.basename(self.metrics_file_path)}.tmp")
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment
