"""What a run prints: by default what the job runs, a periodic progress line (:class:`Progress`:
done / total, tokens per second, time left) and the result, without library tips, per-load
progress bars or known third-party deprecation warnings; ``verbose`` keeps them all.

Entry points call :func:`quiet` at start-up (training jobs: ``verbose`` in conf/train.yaml).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

# Lightning's start-up chatter (accelerator lines, litlogger tips, "restoring states", "fit
# stopped"): useful when debugging, noise in a table's log.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# Warnings raised inside third-party code about that code itself, not about this project's use
# of it. Each entry: (message regex, why it is silenced).
KNOWN_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", "Lightning's own use of a deprecated torch API"),
    (r".*Checkpoint directory .* exists and is not empty", "a resumed run writes there again"),
    (r".*The dirpath has changed from", "a moved run folder (or another run's checkpoint) resumes"),
    (r".*does not have many workers which may be a bottleneck", "prompts are tensors in memory"),
    (r".*The number of training batches .* is smaller than the logging interval", "tiny runs"),
)


def quiet(verbose: bool = False) -> None:
    """Silence library chatter (``verbose``: leave everything as the libraries set it)."""
    if verbose:
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def headline_metric(metrics: dict[str, float]) -> str | None:
    """The metric a result line shows: the paper's macro average, else an accuracy, else the
    first avg@k."""
    for suffix in ("paper_avg/avg@k", "/accuracy", "/avg@k"):
        found = [name for name in metrics if name.endswith(suffix)]
        if found:
            return found[0]
    return None


def result_line(summary: dict[str, Any]) -> str:
    """One line saying what a training job achieved and cost; a run the divergence guard
    flagged says so first."""
    parts = [f"{summary['method']} (seed {summary['seed']}): {summary['steps']} steps"]
    if summary.get("diverged"):
        parts.insert(0, f"DIVERGED ({summary['diverged']})")
    before, after = summary.get("eval_before"), summary.get("eval_after")
    name = headline_metric(after or {})
    if name is not None:
        start = f"{before[name]:.3f} -> " if before and name in before else ""
        parts.append(f"{name} {start}{after[name]:.3f}")
    parts.append(
        f"mean rollout {summary['mean_generated_length']:.1f} tokens generated, "
        f"{summary['mean_kept_length']:.1f} kept"
    )
    parts.append(f"{summary['fit_time_s']:.0f} s")
    return "; ".join(parts) + f"  [{summary['output_dir']}]"


def duration(seconds: float) -> str:
    """A rough human duration: ``45 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """A progress line for long work, printed at most every ``every_s`` seconds; the first comes
    with the first update after the start, so a run shows its pace early::

        kat: step 12/150 (8%), 1,234 tokens/s, 9 s/step, about 3 min left

    ``update(done, tokens)`` takes the units done so far (out of ``total``) and optionally a
    running token count; rates and time left are measured from the first update on, so work
    resumed mid-way (``done`` > 0 at the start) is not counted as done in no time.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "step",
        every_s: float = 30.0,
        write: Callable[[str], None] = _stderr,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.write, self.clock = write, clock
        self._start: tuple[float, int, int] | None = None  # (time, done, tokens) at the start
        self._last_print: float | None = None

    def start(self, done: int = 0, tokens: int = 0) -> None:
        """Mark where timing starts (by default the first :meth:`update`)."""
        self._start = (self.clock(), done, tokens)

    def line(self, done: int, tokens: int | None = None) -> str:
        """The progress line for ``done`` units (and ``tokens`` so far)."""
        now = self.clock()
        if self._start is None:
            self.start(done, tokens or 0)
        t0, done0, tokens0 = self._start  # type: ignore[misc]
        elapsed, work = now - t0, done - done0
        total = f"/{self.total} ({done / self.total:.0%})" if self.total else ""
        parts = [f"{self.label}: {self.unit} {done}{total}"]
        if tokens is not None and elapsed > 0:
            parts.append(f"{(tokens - tokens0) / elapsed:,.0f} tokens/s")
        if work > 0:
            per = elapsed / work
            parts.append(f"{per:.3g} s/{self.unit}")
            if self.total:
                parts.append(f"about {duration(per * max(0, self.total - done))} left")
        return ", ".join(parts)

    def update(self, done: int, tokens: int | None = None) -> str | None:
        """Print (and return) the line if ``every_s`` passed since the last one, or for the
        first update after the start; else None. Finished work prints nothing: its caller
        reports the result."""
        if self._start is None:
            self.start(done, tokens or 0)
            return None
        if self.total and done >= self.total:
            return None
        now = self.clock()
        if self._last_print is not None and now - self._last_print < self.every_s:
            return None
        self._last_print = now
        text = self.line(done, tokens)
        self.write(text)
        return text
