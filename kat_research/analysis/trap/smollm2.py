"""The trap analysis on a real pretrained pair (issue 14, item 2): SmolLM2-135M-Instruct teaching
a student made of its first ``student_layers`` layers, given a short SFT on GSM8K training
solutions.

    OMP_NUM_THREADS=1 KAT_DATA_DIR=../shared/data python -m kat_research.analysis.trap.smollm2 \
        [student_layers=20] [sft.steps=55] [rollouts=256] \
        [output_dir=results/trap_analysis/smollm2_gsm8k] \
        ['extra_train_overrides=["termination.kat.quantile=0.9"]']

Settings: conf/analysis_smollm2_trap.yaml; results in ``output_dir`` (default
results/smollm2_trap; the committed ones: results/trap_analysis/smollm2_gsm8k). On 1 shared CPU
core: the SFT ~17 min (55 steps x 8 solutions, 20 layers), the 256 rollouts ~13 min.
``teacher_accuracy=64`` instead samples the teacher itself on the same prompts and settings and
prints how often it is right (the ceiling for any student distilled from it).

1. SFT (cached under ``<paths.cache_dir>/trap_analysis/``, keyed by its settings): next-token
   cross-entropy on GSM8K training solutions, rewritten to follow the data preset's instruction
   (the calculator annotations ``<<48/2=24>>`` removed; the ``#### 72`` line replaced by
   ``The final answer is \\boxed{72}.``).
2. ``rollouts`` uncut rollouts of the SFT'd student at T=1, top-p 1, cap ``max_new_tokens``,
   on GSM8K *test* questions (not seen in the SFT), the teacher scoring every token.
3. ``kat_research.analysis.trap.analysis`` on them: categories by math grading and the n-gram
   repetition rule, low-KL segments and KAT's offline cuts at the quantile of the rollouts' own
   window minima (no training run, so no KAT buffer).

KAT's settings are scaled to the 256-token cap as on the testbed: W=16, stride 8, patience 2,
quantile 0.7 (``train_overrides``; add ``termination.kat.*=...`` to ``extra_train_overrides``).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shlex
import time
from collections import Counter
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import output_dir
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches
from kat_research.analysis.trap import analysis as trap_analysis
from kat_research.analysis.trap.verdicts import make_verifier
from kat_research.building.models import fit_steps
from kat_research.building.sft import SFTModule
from kat_research.config import CONFIG_DIR, compose
from kat_research.config.build import build_module
from kat_research.data import PromptDataModule, SourceSpec
from kat_research.lit import warmup_cosine
from kat_research.lit.step_log import StepLog
from kat_research.models import load_causal_lm
from kat_research.models.cache import publish_folder
from kat_research.models.smollm2 import smollm2_model
from kat_research.runtime import set_torch_threads

log = logging.getLogger(__name__)
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


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: set paths.data_dir (or KAT_DATA_DIR) to the offline GSM8K "
            "copies (laid out as gsm8k/test.jsonl and train/gsm8k_train.jsonl)"
        )
    return path


def sft_student(cfg: DictConfig, analysis: DictConfig) -> Path:
    """The SFT'd student's folder (``cfg``: the train config; ``analysis``: this analysis's);
    trained (``sft.steps`` x ``sft.batch_size`` solutions) and cached on first use, keyed by
    every setting that changes it."""
    sft = analysis.sft
    settings = {
        "layers": analysis.student_layers,
        "steps": sft.steps,
        "batch_size": sft.batch_size,
        "lr": sft.lr,
        "max_length": sft.max_length,
        "seed": analysis.seed,
        "version": 1,
    }
    key = "-".join(f"{k}{v}" for k, v in settings.items())
    path = Path(cfg.paths.cache_dir) / "trap_analysis" / f"smollm2-gsm8k-sft-{key}"
    if (path / "config.json").exists():
        log.info("SFT'd student cached at %s", path)
        return path
    source = _existing(Path(cfg.paths.data_dir) / "train" / "gsm8k_train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.parent / "gsm8k_train_sft.jsonl"
    n_rows = write_sft_file(source, data_file)
    L.seed_everything(settings["seed"], workers=True)
    student = smollm2_model(cfg.paths.cache_dir, num_layers=settings["layers"], trainable=True)
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
        batch_size=sft.batch_size,
        max_length=sft.max_length,
        val_size=0,
        seed=settings["seed"],
    )
    data.attach_tokenizer(student.tokenizer)
    module = SFTModule(
        student.model,
        optimizer=functools.partial(torch.optim.AdamW, lr=sft.lr, weight_decay=0.0),
        scheduler=functools.partial(warmup_cosine, warmup_steps=10, min_lr_ratio=0.1),
        tokenizer=student.tokenizer,
    )
    start = time.perf_counter()
    trainer = fit_steps(
        module,
        data,
        sft.steps,
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


def teacher_accuracy(cfg: DictConfig, analysis: DictConfig) -> None:
    """How often the teacher itself answers correctly under the same prompts and sampling (the
    ceiling a student distilled from it can be expected to approach)."""
    teacher = instantiate(cfg.model.teacher)
    module = build_module(cfg, teacher, teacher)
    spec = RolloutSpec(
        n=analysis.teacher_accuracy, batch_size=analysis.batch_size, seed=analysis.seed
    )
    verifier = make_verifier(
        OmegaConf.to_container(cfg.data.source, resolve=True), ngram=10, repeats=3, timeout_s=5.0
    )
    stage = trap_analysis.sample_stage(
        "teacher", "self", module, prompt_batches(cfg, module.tokenizer, spec), spec, verifier
    )
    counts = Counter(v.category for v in stage.verdicts)
    answered = sum(v.answer_correct for v in stage.verdicts)
    print(
        f"teacher as its own student, {spec.n} rollouts: {dict(counts)}; right final answer "
        f"(EOS or not) {answered}/{spec.n}"
    )


def train_config(analysis: DictConfig) -> DictConfig:
    """The train config the analysis reads (``train_overrides``, then
    ``extra_train_overrides``), checked before any model loads."""
    if analysis.teacher_accuracy < 0:
        raise ValueError(f"teacher_accuracy must be >= 0 (0: off), got {analysis.teacher_accuracy}")
    cfg = compose([*analysis.train_overrides, *analysis.extra_train_overrides])
    _existing(Path(cfg.data.source.path))
    return cfg


def run(analysis: DictConfig, command: str = "(called from Python)") -> None:
    """What ``analysis`` (conf/analysis_smollm2_trap.yaml) asks for, recorded as run by
    ``command``: the SFT (cached), then the trap analysis of the pair into ``output_dir``; or
    only the SFT (``sft_only``), or only the teacher's own accuracy (``teacher_accuracy``)."""
    set_torch_threads(analysis.threads)
    cfg = train_config(analysis)
    if analysis.teacher_accuracy:
        teacher_accuracy(cfg, analysis)
        return
    student_dir = sft_student(cfg, analysis)
    if analysis.sft_only:
        return
    student = load_causal_lm(str(student_dir), trainable=False)
    teacher = instantiate(cfg.model.teacher)
    meta = json.loads((student_dir / META_FILE).read_text())
    trap_analysis.measure_pair(
        cfg,
        student,
        teacher,
        n=analysis.rollouts,
        batch_size=analysis.batch_size,
        seed=analysis.seed,
        out=output_dir(analysis),
        command=command,
        notes=[
            f"student: SmolLM2-135M-Instruct's first {analysis.student_layers} layers after "
            f"{meta['steps']} SFT steps x {meta['batch_size']} GSM8K training solutions "
            f"(lr {meta['lr']}, {meta['sft_seconds']:.0f} s, final loss "
            f"{meta['final_loss']:.3f}); teacher: SmolLM2-135M-Instruct (30 layers)",
            "prompts: GSM8K test questions (held out from the SFT), one rollout each",
        ],
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_smollm2_trap")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    run(cfg, shlex.join(["python", "-m", "kat_research.analysis.trap.smollm2", *overrides]))


if __name__ == "__main__":
    main()
