"""Per-token KL traces of training rollouts (``<job>/rollouts/kl_traces.jsonl``): the file
format, written by ``kat_research.lit.rollout_traces.RolloutTraceWriter``, and its reader."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kat_research.layout import TRACE_FILE

# step: optimizer steps before this batch; row: index in the batch; length: tokens generated;
# kept: tokens kept for the loss; stop_reason: eos / max_tokens / terminated; threshold: the
# batch's KAT threshold (None without KAT or while its buffer fills); kl: d_t per generated
# token (None where not finite); prompt / text: the decoded prompt and generation.
TRACE_FIELDS = ("step", "row", "length", "kept", "stop_reason", "threshold", "kl", "prompt", "text")


def read_traces(job_dir: str | Path) -> pd.DataFrame:
    """The traces a job wrote (columns ``TRACE_FIELDS``); empty if it wrote none."""
    path = Path(job_dir) / TRACE_FILE
    if not path.exists():
        return pd.DataFrame(columns=list(TRACE_FIELDS))
    return pd.read_json(path, lines=True)
