"""Lightning's CSV logger, continued across resumes: one run, one ``metrics.csv``.

Lightning deletes an existing ``metrics.csv`` when its logger starts, so a resumed run would lose
the rows of the steps before its checkpoint. This logger keeps them and appends; the caller
first drops the rows of the steps the resumed run logs again
(:func:`kat_research.training.folder.trim_metrics`).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuedWriter(ExperimentWriter):
    """An experiment writer that continues an existing metrics file (its columns included)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment
