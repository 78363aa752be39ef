"""The testbed's trap check (issue 14; `make testbed-trap-check`): loads the testbed teacher and
student of a train config (``train_overrides``; its ``data`` is the task, collatz or
running_sum), then reports

1. the forced-loop probe (top-1 accuracy on each repeated copy of a line; KL on the copies);
2. the rollouts' categories by the task's verifier, each share with a Wilson 95% interval (the
   loop share is ``degenerate``'s);
3. whether wrong values are carried forward (by the student; by the teacher's greedy next line
   after the student's first wrong-result line: carried / reverted / other);
4. the KL of derailed student rollouts after derailment against correct rollouts at the same
   positions;
5. KAT's offline cuts on derailed vs correct rollouts at each threshold quantile: cut rates
   (Fisher's exact test), precision and recall (Wilson 95% intervals), and where the cut (=
   where the rollout's low-KL segment begins) falls relative to the first error: the share of
   cut derailed rollouts whose segment begins at or after the first rejected line's first
   token, and the quartiles of cut minus that token.

    python -m kat_research.analysis.trap.testbed_check [rollouts=128] [output_dir=DIR] ...
    # the running total, a student after OPD (its exported model folder, or a checkpoint):
    python -m kat_research.analysis.trap.testbed_check rollouts=512 \
        'train_overrides=["data=running_sum","eval=running_sum"]' max_new_tokens=448 \
        teacher_dir=<teacher folder> student_dir=<run>/student   # or student_checkpoint=<.ckpt>

Rollouts are the student's own (temperature 1, top-p 1, cap ``max_new_tokens``) on
training-split prompts, encoded by the config's data settings and sampled by the analyses' one
sampler, scored by the teacher; nothing is planted. KAT's rule is the train config's
``termination.kat`` (``analysis.detector`` overrides it), at each of ``quantiles``. Writes
``summary.json``, ``summary.md`` and ``rollouts.csv`` to ``output_dir`` and prints the Markdown.
Settings: conf/analysis_testbed_trap_check.yaml.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import output_dir
from kat_research.analysis.runs import checkpoint_file, with_checkpoint_student
from kat_research.analysis.trap import check as tc
from kat_research.analysis.trap.tasks import task_config, trap_task
from kat_research.analysis.trap.verdicts import score_cuts, share
from kat_research.building import demo_model_info
from kat_research.building.testbed import META_FILE
from kat_research.config import CONFIG_DIR, compose
from kat_research.data.prompts import PromptCollator, format_prompt
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.models import LoadedModel, load_causal_lm
from kat_research.provenance import code_commit
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.runtime import set_torch_threads
from kat_research.termination import kat_rule_from_settings


@torch.no_grad()
def carry_forward(teacher, tokenizer, rows, records, verdicts, task) -> dict:
    """Whether wrong values are carried forward: by the student (share of its later lines that
    are valid steps from its own previous result) and by the teacher (greedy next line after
    the student's first error line, when that line computed a wrong result from the right
    input: carried / reverted to the right value / other, each share with its Wilson 95%
    interval)."""
    own = []
    for r, v in zip(records, verdicts, strict=True):
        if v.category != "correct" and v.onset is not None:
            line = r["text"][: v.onset].count("\n")
            carried = tc.carried_forward_share(r["text"], line, task)
            if carried is not None:
                own.append(carried)
    cases = [
        (row.problem, found)
        for row, r in zip(rows, records, strict=True)
        if (found := tc.error_prefixes(row.problem, r["text"], task)) is not None
    ]
    kinds = []
    if cases:
        engine = RolloutEngine(
            teacher.model,
            sampling=SamplingConfig(0.0, 1.0, 24, (tokenizer.eos_token_id,)),
            pad_token_id=tokenizer.pad_token_id,
        )
        for lo in range(0, len(cases), 64):
            batch = cases[lo : lo + 64]
            enc = tokenizer(
                [format_prompt(tokenizer, start, "") + prefix for start, (prefix, _, _) in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            out = engine.generate(enc.input_ids, enc.attention_mask)
            for b, (_, (_, wrong, right)) in enumerate(batch):
                ids = out.tokens[b, : int(out.lengths[b])].tolist()
                line = tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
                kinds.append(tc.continuation_kind(line, wrong, right, task))
    return {
        "student_carried_share_mean": tc.mean(own),
        "n_student": len(own),
        "n_teacher_cases": len(kinds),
        **{
            key: value
            for k in ("carried", "reverted", "other")
            for key, value in share(kinds.count(k), len(kinds), f"teacher_{k}").items()
        },
    }


def model_info(model: LoadedModel) -> dict[str, Any]:
    """Where a model came from and, for a built testbed model, how it was trained (its
    ``demo_model.json`` less the SFT settings); a model without one (an OPD run's exported
    student, a random-init model) gets its name only."""
    meta = Path(model.name) / META_FILE
    info = demo_model_info(model.name) if meta.is_file() else {}
    return {"name": model.name, **{k: v for k, v in info.items() if k != "sft"}}


def _accuracy(info: dict[str, Any], kind: str) -> str:
    value = info.get(f"{kind}/accuracy")
    return "–" if value is None else f"{value:.3f}"


def cut_positions(cuts: tc.OfflineCuts, verdicts: list[tc.RolloutVerdict]) -> dict[str, float]:
    """Where KAT's cuts of derailed rollouts fall relative to the first error: the share whose
    low-KL segment (the cut) begins at or after the first rejected line's first token, with its
    Wilson 95% interval, and the quartiles of cut minus that token (module docstring)."""
    offsets = tc.cut_offsets(cuts, verdicts)
    q1, median, q3 = tc.quartiles(offsets)
    return {
        "n_cut_with_error": len(offsets),
        **share(sum(o >= 0 for o in offsets), len(offsets), "segment_after_error"),
        "cut_minus_error_q1": q1,
        "cut_minus_error_median": median,
        "cut_minus_error_q3": q3,
    }


def _ci(values: dict, name: str) -> str:
    """``name`` and its interval from ``values`` (``–`` where undefined: no rollouts)."""
    if not math.isfinite(values[name]):
        return "–"
    return f"{values[name]:.2f} [{values[f'{name}_lo']:.2f}, {values[f'{name}_hi']:.2f}]"


def _quartiles(values: dict) -> str:
    """Cut minus error onset as ``median [q1, q3]`` (``–`` with no cut derailed rollout)."""
    if not values["n_cut_with_error"]:
        return "–"
    q1, median, q3 = (values[f"cut_minus_error_{n}"] for n in ("q1", "median", "q3"))
    return f"{median:.0f} [{q1:.0f}, {q3:.0f}]"


def markdown(summary: dict) -> str:
    """The summary as the Markdown tables results/testbed_trap_check.md quotes."""
    fl = summary["forced_loop"]
    copies = range(len(fl["teacher"]))
    kind = summary["task"]
    lines = [
        f"commit {summary['commit']}; task {kind}; held-out greedy accuracy: teacher "
        f"{_accuracy(summary['teacher'], kind)}, student {_accuracy(summary['student'], kind)}",
        "",
        "| forced-loop copy index | " + " | ".join(str(j) for j in copies) + " |",
        "|---|" + "---|" * len(copies),
        *[
            f"| {role} top-1 accuracy | " + " | ".join(f"{a:.3f}" for a in fl[role]) + " |"
            for role in fl
        ],
        "| KL(student‖teacher), loop copy | – | "
        + " | ".join(f"{a:.4f}" for a in summary["forced_loop_kl"]["loop"])
        + " |",
        "| KL, correct line at that place | – | "
        + " | ".join(f"{a:.4f}" for a in summary["forced_loop_kl"]["correct_lines"])
        + " |",
        "",
        "carried forward after the first error: student's later lines valid from its own "
        f"previous result {summary['carry_forward']['student_carried_share_mean']:.2f} "
        f"(n={summary['carry_forward']['n_student']}); teacher's greedy next line after a "
        f"wrong-result line (n={summary['carry_forward']['n_teacher_cases']}): carried "
        f"{summary['carry_forward']['teacher_carried']:.2f}, reverted to the right value "
        f"{summary['carry_forward']['teacher_reverted']:.2f}, other "
        f"{summary['carry_forward']['teacher_other']:.2f}",
        "",
        "| category | n | share [95%] | mean length | mean KL |",
        "|---|---|---|---|---|",
        *[
            f"| {c} | {n} | {_ci(summary['shares'], c)} | {summary['mean_length'][c]:.1f} | "
            f"{summary['mean_kl'][c]:.4f} |"
            for c, n in summary["categories"].items()
        ],
        f"| (ran to the cap, any category) | {summary['capped_total']} | | |",
        "",
        "| KL over the next H tokens | n | derailed mean | correct, same positions | "
        "derailed median | correct median | share derailed < correct | sign-test p |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {a['n']} | {a['derailed_mean']:.4f} | {a['control_mean']:.4f} | "
            f"{a['derailed_median']:.4f} | {a['control_median']:.4f} | "
            f"{a['share_below_control']:.2f} | {a['sign_test_p']:.2g} |"
            for name, a in summary["kl_after_derailment"].items()
        ],
        "",
        "| quantile q | threshold | cut derailed | cut correct | Fisher p "
        "| wrong (p vs correct) | degenerate (p) | capped (p) | cuts at/after onset |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {q} | {k['threshold']:.4g} | {k['cut_derailed']}/{k['n_derailed']} "
            f"({k['rate_derailed']:.2f}) | {k['cut_correct']}/{k['n_correct']} "
            f"({k['rate_correct']:.2f}) | {k['fisher_p']:.2g} "
            f"| {k['rate_wrong']:.2f} (p {k['fisher_p_wrong']:.2g}) "
            f"| {k['rate_degenerate']:.2f} (p {k['fisher_p_degenerate']:.2g}) "
            f"| {k['rate_capped']:.2f} (p {k['fisher_p_capped']:.2g}) "
            f"| {k['cut_after_onset_share']:.2f} |"
            for q, k in summary["kat"].items()
        ],
        "",
        "| quantile q | precision [95%] | recall [95%] | cut derailed with segment at/after "
        "the error [95%] | cut − error onset, median [q1, q3] |",
        "|---|---|---|---|---|",
        *[
            f"| {q} | {_ci(k, 'precision')} | {_ci(k, 'recall')} | "
            f"{_ci(k, 'segment_after_error')} (n={k['n_cut_with_error']}) | {_quartiles(k)} |"
            for q, k in summary["kat"].items()
        ],
    ]
    return "\n".join(lines)


def check_settings(cfg: DictConfig) -> None:
    """Fail before any model loads on a model path that is not there or settings that clash."""
    if cfg.student_dir and cfg.student_checkpoint:
        raise ValueError(
            "set student_dir (a saved model folder) or student_checkpoint (a training "
            "checkpoint), not both"
        )
    for key in ("teacher_dir", "student_dir"):
        if cfg[key] and not (Path(cfg[key]) / "config.json").is_file():
            raise FileNotFoundError(
                f"{key}={cfg[key]} holds no saved model (config.json): point it at a folder "
                "save_pretrained wrote (an OPD run's <run>/student, a testbed model folder)"
            )
    if cfg.student_checkpoint:
        checkpoint_file(cfg.student_checkpoint)


def load_student(cfg: DictConfig, train_cfg: DictConfig) -> LoadedModel:
    """The student checked: ``student_dir``, else the train config's student with
    ``student_checkpoint``'s student weights when set, else the train config's student."""
    if cfg.student_dir:
        return load_causal_lm(cfg.student_dir, trainable=False)
    student = instantiate(train_cfg.model.student)
    if cfg.student_checkpoint:
        student = with_checkpoint_student(student, cfg.student_checkpoint)
    return student


def run(cfg: DictConfig, command: str) -> dict:
    """The check ``cfg`` (conf/analysis_testbed_trap_check.yaml) describes, recorded as run by
    ``command``; the summary it wrote."""
    set_torch_threads(cfg.threads)
    check_settings(cfg)
    train_cfg = compose(list(cfg.train_overrides))
    task = task_config(OmegaConf.to_container(train_cfg.data.source, resolve=True))
    kind = trap_task(task).kind
    start = time.perf_counter()
    teacher = (
        load_causal_lm(cfg.teacher_dir, trainable=False)
        if cfg.teacher_dir
        else instantiate(train_cfg.model.teacher)
    )
    student = load_student(cfg, train_cfg)
    tokenizer = teacher.tokenizer
    data = train_cfg.data
    collate = PromptCollator(
        tokenizer, data.max_prompt_tokens, data.instruction, data.get("system")
    )
    rule = kat_rule_from_settings(
        OmegaConf.to_container(train_cfg.termination.kat, resolve=True),
        OmegaConf.to_container(cfg.analysis.detector, resolve=True),
    )
    summary: dict = {
        "command": command,
        "train_overrides": list(cfg.train_overrides),
        "settings": {
            k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"
        },
        "rule": str(rule),
        "task": kind,
        "teacher": model_info(teacher),
        "student": model_info(student),
        "models_ready_s": time.perf_counter() - start,
        "commit": code_commit(),
    }

    eval_problems = trap_task(task).probe_problems("eval", cfg.probe_problems.eval)
    train_problems = trap_task(task).probe_problems("train", cfg.probe_problems.train)
    summary["forced_loop"] = {
        role: tc.forced_loop_accuracy(m.model, tokenizer, eval_problems, task)
        for role, m in (("teacher", teacher), ("student", student))
    }

    loop_kl, control_kl = tc.forced_loop_kl(
        student.model, teacher.model, tokenizer, eval_problems + train_problems, task
    )
    summary["forced_loop_kl"] = {"loop": loop_kl, "correct_lines": control_kl}

    rows, _ = load_rows(
        SourceSpec(kind=kind, split="train", n=cfg.rollouts, seed=1000 + cfg.seed, task=task)
    )
    t0 = time.perf_counter()
    scored = tc.sample_scored_rollouts(
        student.model,
        teacher.model,
        collate,
        rows,
        task,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    kls = [r.kl for r in scored]
    verdicts = [r.verdict for r in scored]
    records = [
        {"start": r.start, "length": r.kl.numel(), "stop": r.stop, "text": r.text} for r in scored
    ]
    summary["rollout_s"] = time.perf_counter() - t0

    summary["carry_forward"] = carry_forward(teacher, tokenizer, rows, records, verdicts, task)
    counts = {c: sum(v.category == c for v in verdicts) for c in tc.CATEGORIES}
    summary["categories"] = counts
    summary["shares"] = {
        k: v for c, n in counts.items() for k, v in share(n, len(verdicts), c).items()
    }
    summary["capped_total"] = sum(r["stop"] == "max_tokens" for r in records)
    summary["mean_length"] = {
        c: tc.mean([r["length"] for r, v in zip(records, verdicts, strict=True) if v.category == c])
        for c in tc.CATEGORIES
    }
    summary["mean_kl"] = {
        c: tc.mean([float(k.mean()) for k, v in zip(kls, verdicts, strict=True) if v.category == c])
        for c in tc.CATEGORIES
    }
    after = {}
    for name, use_loop in (("after_error", False), ("after_loop_onset", True)):
        res = tc.kl_after_derailment(kls, verdicts, horizon=cfg.horizon, use_loop_onset=use_loop)
        after[name] = {
            "n": len(res.derailed),
            "n_without_control": res.n_without_control,
            "derailed_mean": tc.mean(res.derailed),
            "control_mean": tc.mean(res.control),
            "derailed_median": tc.median(res.derailed),
            "control_median": tc.median(res.control),
            "share_below_control": res.share_below_control,
            "sign_test_p": res.sign_test_p,
        }
    summary["kl_after_derailment"] = after
    summary["kat"] = {}
    cuts_at = {}
    for q in cfg.quantiles:
        cuts = tc.offline_kat_cuts(kls, rule.with_quantile(q))
        cuts_at[q] = cuts
        scored_cuts = score_cuts([c is not None for c in cuts.cut], [v.category for v in verdicts])
        summary["kat"][str(q)] = {
            **tc.cut_rate_table(cuts, verdicts),
            "cut_after_onset_share": tc.cut_after_onset_share(cuts, verdicts),
            **{
                f"{name}{suffix}": scored_cuts[f"{name}{suffix}"]
                for name in ("precision", "recall")
                for suffix in ("", "_lo", "_hi")
            },
            **cut_positions(cuts, verdicts),
        }

    out = output_dir(cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "rollouts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "start",
                "category",
                "stop",
                "length",
                "onset",
                "loop_onset",
                "mean_kl",
                *[f"cut_q{q}" for q in cfg.quantiles],
                "text",
            ]
        )
        for i, (r, v, k) in enumerate(zip(records, verdicts, kls, strict=True)):
            writer.writerow(
                [
                    r["start"],
                    v.category,
                    r["stop"],
                    r["length"],
                    v.onset,
                    v.loop_onset,
                    f"{float(k.mean()):.4f}",
                    *[cuts_at[q].cut[i] for q in cfg.quantiles],
                    r["text"],
                ]
            )
    (out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_testbed_trap_check")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(cfg, shlex.join(["python", "-m", "kat_research.analysis.trap.testbed_check", *overrides]))


if __name__ == "__main__":
    main()
