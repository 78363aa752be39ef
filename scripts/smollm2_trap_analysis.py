"""The trap analysis on a real pretrained pair (issue 14, item 2): SmolLM2-135M-Instruct teaching
a student made of its first ``--layers`` layers, given a short SFT on GSM8K training solutions.

    OMP_NUM_THREADS=1 KAT_DATA_DIR=../shared/data python scripts/smollm2_trap_analysis.py \
        [--layers 20] [--sft-steps 55] [--rollouts 256] \
        [--out results/trap_analysis/smollm2_gsm8k] [hydra override ...]

On 1 shared CPU core: the SFT ~17 min (55 steps x 8 solutions, 20 layers), the 256 rollouts
~13 min. ``--teacher-accuracy 64`` instead samples the teacher itself on the same prompts and
settings and prints how often it is right (the ceiling for any student distilled from it).

1. SFT (cached under ``<paths.cache_dir>/trap_analysis/``, keyed by its settings): next-token
   cross-entropy on GSM8K training solutions, rewritten to follow the data preset's instruction
   (the calculator annotations ``<<48/2=24>>`` removed; the ``#### 72`` line replaced by
   ``The final answer is \\boxed{72}.``).
2. ``--rollouts`` uncut rollouts of the SFT'd student at T=1, top-p 1, cap ``--max-new-tokens``,
   on GSM8K *test* questions (not seen in the SFT), the teacher scoring every token.
3. ``kat_research.analysis.trap.analysis`` on them: categories by math grading and the n-gram
   repetition rule, low-KL segments and KAT's offline cuts at the quantile of the rollouts' own
   window minima (no training run, so no KAT buffer).

KAT's settings are scaled to the 256-token cap as on the testbed: W=16, stride 8, patience 2,
quantile 0.7 (override with ``termination.kat.*=...``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kat_research import config
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches
from kat_research.analysis.trap import analysis as trap_analysis
from kat_research.analysis.trap.verdicts import make_verifier
from kat_research.building.models import fit_steps
from kat_research.building.sft import SFTModule
from kat_research.config.build import build_module
from kat_research.data import PromptDataModule, SourceSpec
from kat_research.lit import warmup_cosine
from kat_research.lit.step_log import StepLog
from kat_research.models import load_causal_lm
from kat_research.models.cache import publish_folder
from kat_research.models.smollm2 import smollm2_model

log = logging.getLogger("smollm2_trap_analysis")
PRESETS = [
    "experiment=smollm2_gsm8k",
    # rollouts on held-out questions: the SFT saw the training split
    "data.source.path=${paths.data_dir}/gsm8k/test.jsonl",
    "rollout.temperature=1.0",
    "rollout.top_p=1.0",
    "termination.kat.window=16",
    "termination.kat.stride=8",
    "termination.kat.patience=2",
    "termination.kat.quantile=0.7",
]
_CALCULATOR = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
META_FILE = "sft.json"


def sft_solution(answer: str) -> str:
    """A GSM8K worked solution as the SFT target: annotations dropped, the final ``#### x``
    line written as ``The final answer is \\boxed{x}.`` (what the prompt's instruction asks)."""
    text = _CALCULATOR.sub("", answer)
    final = _FINAL.search(text)
    if final is None:
        raise ValueError(f"GSM8K solution without a '####' line: {answer[-80:]!r}")
    return text[: final.start()].rstrip() + f"\nThe final answer is \\boxed{{{final.group(1)}}}."


def write_sft_file(source: Path, target: Path) -> int:
    """Rewrite GSM8K train rows (question, answer) as (question, answer, solution) JSONL."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(target, "w") as f:
        for row in rows:
            row["solution"] = sft_solution(row["answer"])
            f.write(json.dumps(row) + "\n")
    return len(rows)


def sft_student(cfg, args) -> Path:
    """The SFT'd student's folder; trained (about ``--sft-steps`` x batch) and cached on first
    use, keyed by every setting that changes it."""
    settings = {
        "layers": args.layers,
        "steps": args.sft_steps,
        "batch_size": args.sft_batch,
        "lr": args.sft_lr,
        "max_length": args.sft_max_length,
        "seed": args.seed,
        "version": 1,
    }
    key = "-".join(f"{k}{v}" for k, v in settings.items())
    path = Path(cfg.paths.cache_dir) / "trap_analysis" / f"smollm2-gsm8k-sft-{key}"
    if (path / "config.json").exists():
        log.info("SFT'd student cached at %s", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.parent / "gsm8k_train_sft.jsonl"
    n_rows = write_sft_file(Path(cfg.paths.data_dir) / "train" / "gsm8k_train.jsonl", data_file)
    L.seed_everything(args.seed, workers=True)
    student = smollm2_model(cfg.paths.cache_dir, num_layers=args.layers, trainable=True)
    data = PromptDataModule(
        source=SourceSpec(
            kind="file",
            path=str(data_file),
            problem_field="question",
            answer_field="answer",
            solution_field="solution",
            answer_transform="gsm8k",
        ),
        instruction=cfg.data.instruction,
        system=cfg.data.system,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        mode="sft",
        batch_size=args.sft_batch,
        max_length=args.sft_max_length,
        val_size=0,
        seed=args.seed,
    )
    data.attach_tokenizer(student.tokenizer)
    module = SFTModule(
        student.model,
        optimizer=functools.partial(torch.optim.AdamW, lr=args.sft_lr, weight_decay=0.0),
        scheduler=functools.partial(warmup_cosine, warmup_steps=10, min_lr_ratio=0.1),
        tokenizer=student.tokenizer,
    )
    start = time.perf_counter()
    trainer = fit_steps(
        module,
        data,
        args.sft_steps,
        [StepLog("sft", every_n_steps=10, metrics=("sft/loss",))],
        accelerator="cpu",
    )
    meta = {
        **settings,
        "sft_seconds": time.perf_counter() - start,
        "sft_rows_available": n_rows,
        "final_loss": float(trainer.callback_metrics.get("sft/loss", float("nan"))),
    }
    with publish_folder(path) as tmp:
        student.model.save_pretrained(tmp)
        student.tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info("SFT done in %.0f s: %s", meta["sft_seconds"], path)
    return path


def teacher_accuracy(cfg, args) -> None:
    """How often the teacher itself answers correctly under the same prompts and sampling (the
    ceiling a student distilled from it can be expected to approach)."""
    teacher = instantiate(cfg.model.teacher)
    module = build_module(cfg, teacher, teacher)
    spec = RolloutSpec(n=args.teacher_accuracy, batch_size=args.batch_size, seed=args.seed)
    verifier = make_verifier(
        OmegaConf.to_container(cfg.data.source, resolve=True), ngram=10, repeats=3, timeout_s=5.0
    )
    stage = trap_analysis.sample_stage(
        "teacher", "self", module, prompt_batches(cfg, module, spec), spec, verifier
    )
    counts = Counter(v.category for v in stage.verdicts)
    answered = sum(v.answer_correct for v in stage.verdicts)
    print(
        f"teacher as its own student, {spec.n} rollouts: {dict(counts)}; right final answer "
        f"(EOS or not) {answered}/{spec.n}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=20, help="student: the teacher's first N layers")
    p.add_argument("--sft-steps", type=int, default=55, help="SFT optimizer steps")
    p.add_argument("--sft-batch", type=int, default=8, help="SFT examples per step")
    p.add_argument("--sft-lr", type=float, default=1e-4, help="SFT peak learning rate")
    p.add_argument("--sft-max-length", type=int, default=384, help="SFT prompt+solution tokens")
    p.add_argument("--rollouts", type=int, default=256, help="uncut student rollouts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout cap")
    p.add_argument("--batch-size", type=int, default=16, help="rollouts generated together")
    p.add_argument("--seed", type=int, default=0, help="SFT, prompt draw and sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--sft-only", action="store_true", help="stop after the (cached) SFT")
    p.add_argument(
        "--teacher-accuracy",
        type=int,
        default=0,
        help="instead: N rollouts of the teacher itself (same prompts and sampling), graded",
    )
    p.add_argument("--out", default="results/trap_analysis/smollm2_gsm8k")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = [
        *PRESETS,
        f"model.student.num_layers={args.layers}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"seed={args.seed}",
        *args.overrides,
    ]
    cfg = config.compose(overrides)
    if args.teacher_accuracy:
        teacher_accuracy(cfg, args)
        return
    student_dir = sft_student(cfg, args)
    if args.sft_only:
        return
    student = load_causal_lm(str(student_dir), trainable=False)
    teacher = instantiate(cfg.model.teacher)
    meta = json.loads((student_dir / META_FILE).read_text())
    trap_analysis.measure_pair(
        cfg,
        student,
        teacher,
        n=args.rollouts,
        batch_size=args.batch_size,
        seed=args.seed,
        out=Path(args.out),
        command=shlex.join(["python", *sys.argv]),
        notes=[
            f"student: SmolLM2-135M-Instruct's first {args.layers} layers after "
            f"{meta['steps']} SFT steps x {meta['batch_size']} GSM8K training solutions "
            f"(lr {meta['lr']}, {meta['sft_seconds']:.0f} s, final loss "
            f"{meta['final_loss']:.3f}); teacher: SmolLM2-135M-Instruct (30 layers)",
            "prompts: GSM8K test questions (held out from the SFT), one rollout each",
        ],
    )


if __name__ == "__main__":
    main()
