"""What a run prints: the progress line of long work (:class:`kat_research.console.Progress`),
the bare train command's plan, and a diverged run's result line."""

from __future__ import annotations

from kat_research.console import Progress, duration, result_line
from kat_research.training.job import plan_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_its_pace_early_then_every_interval() -> None:
    clock, lines = Clock(), []
    progress = Progress("kat", 150, every_s=30, write=lines.append, clock=clock)
    progress.start(done=10, tokens=1000)  # a resumed run: 10 steps were done before
    clock.now += 4.0
    # 2 steps and 8,000 tokens in 4 s; 138 steps left at 2 s each: 276 s
    assert progress.update(12, tokens=9000) == (
        "kat: step 12/150 (8%), 2,000 tokens/s, 2 s/step, about 5 min left"
    )
    clock.now += 10.0
    assert progress.update(17, tokens=20000) is None  # within 30 s of the last line
    clock.now += 20.0
    line = progress.update(25, tokens=30000)
    # 15 steps and 29,000 tokens in 34 s; 125 steps left at 34/15 s each: 283 s
    assert line == "kat: step 25/150 (17%), 853 tokens/s, 2.27 s/step, about 5 min left"
    clock.now += 60.0
    assert progress.update(150, tokens=90000) is None  # finished: the result line follows
    assert lines == [lines[0], line]


def test_progress_without_a_total_shows_the_rate_only() -> None:
    clock, lines = Clock(), []
    progress = Progress("eval", None, unit="sample", every_s=0, write=lines.append, clock=clock)
    progress.start()
    clock.now += 2.0
    progress.update(8)
    assert lines == ["eval: sample 8, 0.25 s/sample"]


def test_duration_is_rough() -> None:
    assert [duration(s) for s in (45, 600, 9000)] == ["45 s", "10 min", "2.5 h"]


def test_the_bare_train_command_says_what_it_runs_and_how_long(compose_config) -> None:
    cfg = compose_config("paths.output_dir=/tmp/run")
    assert plan_line(cfg) == (
        "training kat (seed 0) for 150 optimizer steps of 32 prompts x 1 rollouts of up to 512 "
        "tokens into /tmp/run; about 42 min on a CPU core (scale.seconds_per_step=17)"
    )
    assert "about" not in plan_line(compose_config("paths.output_dir=/tmp/run", "scale=smoke"))


def test_a_diverged_run_says_so_first() -> None:
    summary = {
        "method": "opd",
        "seed": 0,
        "steps": 2,
        "mean_generated_length": 12.0,
        "mean_kept_length": 12.0,
        "fit_time_s": 3.0,
        "output_dir": "/tmp/run",
        "diverged": "step 1: the student's weight tensor x reached max |w| = 1001",
    }
    assert result_line(summary).startswith(
        "DIVERGED (step 1: the student's weight tensor x reached max |w| = 1001); opd (seed 0)"
    )
