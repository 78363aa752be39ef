"""Data parallelism on the CPU with 2 processes (gloo): disjoint resumable prompt shards, a
global KAT buffer, loss normalisation equal to one process on the global batch, and the
`trainer=ddp` / `trainer=fsdp` presets end to end (rank 0 writes the files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import KAT, free_port, kat_step, rank_kl, rank_mask, worker
from safetensors.torch import load_file

from kat_research import config
from kat_research.data.sampler import ResumableBatchSampler
from kat_research.layout import LENGTHS_FILE
from kat_research.losses import token_weights
from kat_research.termination import KATTerminator, kat_rule
from kat_research.training.job import train

ROOT = Path(__file__).resolve().parent.parent

# Greedy rollouts (the same tokens whatever the batch split or RNG) and plain SGD without
# clipping or schedule, so the weights after a step are a linear function of the gradient:
# a DDP step equals a single-process step only if the loss normalisation is right.
RUN = [
    "debug=fast",
    "method=kat",
    "trainer.max_epochs=-1",
    "trainer.precision=32-true",
    "trainer.gradient_clip_val=null",
    "rollout.temperature=0",
    "termination.kat.patience=4",
    "termination.kat.exempt=4",
    "optimizer._target_=torch.optim.SGD",
    "optimizer.lr=0.5",
    "~optimizer.betas",
    "~optimizer.eps",
    "scheduler=none",
    "logger=csv",
    "eval=synthetic",
    "eval.at_start=true",
    "eval.evaluator.n_problems=8",
    "eval.evaluator.max_new_tokens=8",
    "eval.every_n_steps=1",
]


# --------------------------------------------------------------------------- sampler


def test_sampler_gives_ranks_disjoint_shards_of_each_global_batch():
    single = list(ResumableBatchSampler(20, 4, seed=3))
    ranks = [list(ResumableBatchSampler(20, 4, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert all(len(r) == len(single) == 5 for r in ranks)
    for b, batch in enumerate(single):
        assert not set(ranks[0][b]) & set(ranks[1][b])
        assert ranks[0][b] + ranks[1][b] == batch
    resumed = ResumableBatchSampler(20, 4, seed=3, rank=1, world_size=2, consumed=lambda: 2)
    assert list(resumed) == ranks[1][2:]
    # 7 batches consumed: epoch 1, batch 2, split the same way as in one process
    later = [
        list(ResumableBatchSampler(20, 4, seed=3, rank=r, world_size=2, consumed=lambda: 7))
        for r in (0, 1)
    ]
    single_later = list(ResumableBatchSampler(20, 4, seed=3, consumed=lambda: 7))
    assert [a + b for a, b in zip(*later, strict=True)] == single_later
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatchSampler(20, 5, rank=0, world_size=2)


# --------------------------------------------------------------------------- collectives


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_kat_buffer_and_threshold_are_global(ranks):
    """Both ranks hold the buffer, thresholds and cut counts one process computes from the
    union of their rollouts (rank 0's rows first), over three steps."""
    single = KATTerminator(kat_rule(**KAT))

    def union(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        (kl0, len0), (kl1, len1) = rank_kl(0, step), rank_kl(1, step)
        return torch.cat([kl0, kl1]), torch.cat([len0, len1])

    metrics = [kat_step(single, *union(step)) for step in range(2)]
    buffer = single.buffer
    metrics.append(kat_step(single, *union(2)))
    assert buffer.numel() == 12  # FIFO eviction happened
    assert metrics[2]["kat/cut_rows"] > 0  # the global threshold cut rows
    for rank in ranks:
        torch.testing.assert_close(rank["buffer"], buffer, rtol=0, atol=0)
        for seen, expected in zip(rank["metrics"], metrics, strict=True):
            assert seen == pytest.approx(expected, rel=0, abs=0, nan_ok=True)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_rank_loss_weights_average_to_single_process_weights(ranks, aggregation):
    """DDP averages the ranks' gradients, so each rank's weights / 2 must be the single-process
    weights of its rows on the union batch."""
    union = torch.cat([rank_mask(0), rank_mask(1)])
    single = token_weights(union, aggregation)
    per_rank = torch.cat([r["weights"][aggregation] for r in ranks]) / 2
    torch.testing.assert_close(per_rank, single)
    assert abs(float(single.sum()) - 1.0) < 1e-6


# --------------------------------------------------------------------------- train runs


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KAT_ROOT": str(root),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _launch(root: Path, preset: str, cache: Path) -> Path:
    """A 2-rank CPU run of `python -m kat_research.train trainer=<preset>`; its job folder."""
    cmd = [
        sys.executable,
        "-m",
        "kat_research.train",
        f"trainer={preset}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.cache_dir={cache}",
        *RUN,
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(root), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("kat (seed 0):") == 1  # one result line: rank 0
    (job,) = (root / "outputs" / "kat").iterdir()
    return job


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    train(config.compose([f"paths.output_dir={root}", f"paths.cache_dir={root / 'cache'}", *RUN]))
    return root


def _per_step(job: Path) -> pd.DataFrame:
    df = pd.read_csv(job / "csv" / "metrics.csv")
    cols = ["train/loss", "train/kl", "len/generated", "total/tokens_generated"]
    cols += ["kat/threshold", "kat/buffer_size", "kat/cut_rows"]
    return df.dropna(subset=["train/loss"]).groupby("step")[cols].last()


def _check_matches_single_process(job: Path, single: Path) -> None:
    # metrics: global sums / means over both ranks equal the single process's
    pd.testing.assert_frame_equal(_per_step(job), _per_step(single), rtol=1e-5)
    a, b = (json.loads((p / "summary.json").read_text()) for p in (job, single))
    for key in ("steps", "rollouts", "tokens_generated", "tokens_kept"):
        assert a[key] == b[key], key
    # rank 0 evaluated the same weights at every step (on gathered weights under FSDP)
    assert a["eval_after"] is not None
    assert a["eval_before"] == b["eval_before"] and a["eval_after"] == b["eval_after"]
    # every rank's rollout rows, gathered into rank 0's lengths file (rank order, not row order)
    rows = [pd.read_csv(p / LENGTHS_FILE) for p in (job, single)]
    assert list(rows[0].row) == list(rows[1].row)
    key = ["step", "generated", "kept", "stop_reason"]
    ours, theirs = (r[key].sort_values(key, ignore_index=True) for r in rows)
    pd.testing.assert_frame_equal(ours, theirs)
    written = sorted(p.name for p in (job / "eval").iterdir())
    assert written == [f"step{i:06d}.jsonl" for i in range(3)]
    # weights after two SGD steps
    trained, reference = (load_file(p / "student" / "model.safetensors") for p in (job, single))
    start = torch.load(single / "checkpoints" / "step000001.ckpt", weights_only=False)
    moved = 0.0
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((value - start["state_dict"][f"student.{name}"]).abs().max()))
    assert moved > 1e-4  # the second step changed the weights
    # the checkpoint: student only, the global KAT buffer, one RNG state per rank
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
    ref = torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("student.") for k in ckpt["state_dict"])
    buffers = ckpt["terminator"]["buffer"], ref["terminator"]["buffer"]
    torch.testing.assert_close(*buffers, rtol=1e-5, atol=1e-6)  # float32 KL, other padding
    assert ckpt["terminator"]["optimizer_steps"] == 2
    rng = ckpt["rollout_rng"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])


def test_ddp_run_equals_single_process_run(tmp_path, single_run):
    """`trainer=ddp` on 2 CPU ranks: 2 steps complete, rank 0 writes one summary and one
    exported student, and losses, metrics, KAT state and weights equal one process's."""
    job = _launch(tmp_path, "ddp", single_run / "cache")
    _check_matches_single_process(job, single_run)
    assert sorted(p.name for p in job.glob("*.json")) == ["run.json", "summary.json"]
    assert json.loads((job / "run.json").read_text())["attempts"] == 1  # claimed by rank 0 only
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(job / "student").config.vocab_size > 0


def test_fsdp_run_equals_single_process_run(tmp_path, single_run):
    """`trainer=fsdp` (FSDP2 fully_shard via ModelParallelStrategy) on 2 CPU ranks."""
    job = _launch(tmp_path, "fsdp", single_run / "cache")
    _check_matches_single_process(job, single_run)
