"""What a run prints: by default one progress line per job and the result, without library tips,
per-load progress bars or known third-party deprecation warnings; ``verbose`` keeps them all.

Entry points call :func:`quiet` at start-up (training jobs: ``verbose`` in conf/train.yaml).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

# Lightning's start-up chatter (accelerator lines, litlogger tips, "restoring states", "fit
# stopped"): useful when debugging, noise in a table's log.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# Warnings raised inside third-party code about that code itself, not about this project's use
# of it. Each entry: (message regex, why it is silenced).
KNOWN_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", "Lightning's own use of a deprecated torch API"),
    (r".*Checkpoint directory .* exists and is not empty", "a resumed run writes there again"),
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
    """One line saying what a training job achieved and cost."""
    parts = [f"{summary['method']} (seed {summary['seed']}): {summary['steps']} steps"]
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
