"""The testbed's trap check (issue 14; `make testbed-trap-check`): loads the testbed teacher and
student of a train config (``train_overrides``), then reports

1. the teacher's forced-loop probe (top-1 accuracy on each repeated copy of a line);
2. the KL of derailed student rollouts after derailment against correct rollouts at the same
   positions;
3. KAT's offline cut rate on derailed vs correct rollouts (Fisher's exact test).

    python -m kat_research.analysis.trap.testbed_check [rollouts=128] [output_dir=DIR] ...

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
import shlex
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.context import output_dir
from kat_research.analysis.trap import check as tc
from kat_research.building import demo_model_info
from kat_research.config import CONFIG_DIR, compose
from kat_research.data.collatz import CollatzTaskConfig
from kat_research.data.prompts import PromptCollator, format_prompt
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.models import load_causal_lm
from kat_research.provenance import code_commit
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.runtime import set_torch_threads
from kat_research.termination import kat_rule_from_settings


@torch.no_grad()
def carry_forward(teacher, tokenizer, rows, records, verdicts, task) -> dict:
    """Whether wrong values are carried forward: by the student (share of its later lines that
    are valid steps from its own previous result) and by the teacher (greedy next line after
    the student's first error line, when that line computed a wrong result from the right
    input: carried / reverted to the right value / other)."""
    own = []
    for r, v in zip(records, verdicts, strict=True):
        if v.category != "correct" and v.onset is not None:
            line = r["text"][: v.onset].count("\n")
            share = tc.carried_forward_share(r["text"], line, task)
            if share is not None:
                own.append(share)
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
            f"teacher_{k}": kinds.count(k) / len(kinds) if kinds else float("nan")
            for k in ("carried", "reverted", "other")
        },
    }


def train_starts(task: CollatzTaskConfig, n: int = 64) -> list[int]:
    """Up to ``n`` distinct training-split starts (the prompts OPD samples)."""
    rows, _ = load_rows(SourceSpec(kind="collatz", split="train", n=4 * n, seed=7, task=task))
    return sorted({int(r.problem) for r in rows})[:n]


def markdown(summary: dict) -> str:
    """The summary as the Markdown tables results/testbed_trap_check.md quotes."""
    fl = summary["forced_loop"]
    copies = range(len(fl["teacher"]))
    lines = [
        f"commit {summary['commit']}; held-out greedy accuracy: teacher "
        f"{summary['teacher']['collatz/accuracy']:.3f}, "
        f"student {summary['student']['collatz/accuracy']:.3f}",
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
        "| category | n | mean length | mean KL |",
        "|---|---|---|---|",
        *[
            f"| {c} | {n} | {summary['mean_length'][c]:.1f} | {summary['mean_kl'][c]:.4f} |"
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
    ]
    return "\n".join(lines)


def run(cfg: DictConfig, command: str) -> dict:
    """The check ``cfg`` (conf/analysis_testbed_trap_check.yaml) describes, recorded as run by
    ``command``; the summary it wrote."""
    set_torch_threads(cfg.threads)
    train_cfg = compose(list(cfg.train_overrides))
    task = CollatzTaskConfig(**train_cfg.data.source.task)
    start = time.perf_counter()
    teacher = (
        load_causal_lm(cfg.teacher_dir, trainable=False)
        if cfg.teacher_dir
        else instantiate(train_cfg.model.teacher)
    )
    student = (
        load_causal_lm(cfg.student_dir, trainable=False)
        if cfg.student_dir
        else instantiate(train_cfg.model.student)
    )
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
        "teacher": {k: v for k, v in demo_model_info(teacher.name).items() if k != "sft"},
        "student": {k: v for k, v in demo_model_info(student.name).items() if k != "sft"},
        "models_ready_s": time.perf_counter() - start,
        "commit": code_commit(),
    }

    eval_starts = [
        int(r.problem)
        for r in load_rows(SourceSpec(kind="collatz", split="eval", n=39, task=task))[0]
    ]
    summary["forced_loop"] = {
        role: tc.forced_loop_accuracy(m.model, tokenizer, eval_starts, task)
        for role, m in (("teacher", teacher), ("student", student))
    }

    loop_kl, control_kl = tc.forced_loop_kl(
        student.model, teacher.model, tokenizer, eval_starts + train_starts(task), task
    )
    summary["forced_loop_kl"] = {"loop": loop_kl, "correct_lines": control_kl}

    rows, _ = load_rows(
        SourceSpec(kind="collatz", split="train", n=cfg.rollouts, seed=1000 + cfg.seed, task=task)
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
        summary["kat"][str(q)] = {
            **tc.cut_rate_table(cuts, verdicts),
            "cut_after_onset_share": tc.cut_after_onset_share(cuts, verdicts),
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
