"""The run's CSV logger: rows survive a resume, and a new column's rewrite is all or nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kat_research.lit.csv_logger import ResumableCSVLogger


def rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_logger_appends_to_the_existing_file(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    first.log_metrics({"train/loss": 1.0}, step=0)
    again = ResumableCSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    again.log_metrics({"train/loss": 0.5}, step=1)
    logged = rows(again.experiment.metrics_file_path)
    assert [(r["step"], r["train/loss"]) for r in logged] == [("0", "1.0"), ("1", "0.5")]


def test_a_new_column_rewrites_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    logger = ResumableCSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 - step / 10}, step=step)
    path = logger.experiment.metrics_file_path
    before = open(path).read()

    def killed(self, rows):  # the process dies while the rewrite writes the old rows
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(csv.DictWriter, "writerows", killed)
        with pytest.raises(KeyboardInterrupt):
            logger.log_metrics({"train/loss": 0.7, "kat/threshold": 0.2}, step=3)
    assert open(path).read() == before  # Lightning's in-place rewrite had truncated it here

    resumed = ResumableCSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    resumed.log_metrics({"train/loss": 0.7, "kat/threshold": 0.2}, step=3)
    logged = rows(path)
    assert [r["step"] for r in logged] == ["0", "1", "2", "3"]
    assert logged[3]["kat/threshold"] == "0.2" and logged[0]["kat/threshold"] == ""
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["metrics.csv"]  # no tmp left
