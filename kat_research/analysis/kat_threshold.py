"""Where a KAT run's saving came from (issue 23 item 2): the run's own logged threshold over
training (``kat/threshold``, ``kat/active``) and the cut verdicts it logged (``verdict/*``,
``lit/cut_verdicts.py``), summed by phase of training.

    python -m kat_research.analysis.kat_threshold run_dir=<KAT job> [reference_dir=<OPD job>]

Each step's counts are recovered from the logged means and shares (:func:`step_counts`): rows =
the step's generated tokens (the increase of ``total/tokens_generated``) / ``len/generated``;
cut rows, cut rows whose kept prefix holds an error, dropped tokens (generated - kept) on
derailed and on valid prefixes, uncut rows per category. :func:`phase_table` sums them over
``phases`` equal step ranges; with a reference run (OPD, same prompts per step) the saving of a
phase is ``(reference generated - KAT generated) per rollout x rows``. The thresholds the run
used (each phase's mean active threshold) are printed as a ``kat_thresholds=[...]`` override
for the termination benchmark, the fixed-threshold sweep on one set of rollouts.
Settings: conf/analysis_kat_threshold.yaml.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kat_research.analysis.trap.verdicts import wilson_interval
from kat_research.config import CONFIG_DIR
from kat_research.data.first_error import CATEGORIES
from kat_research.provenance import code_commit

#: the per-step counts of :func:`step_counts`, summed by :func:`phase_table`
COUNTS = (
    "rows",
    "generated",
    "kept",
    "cut",
    "cut_derailed",
    "dropped",
    "dropped_derailed",
    *(f"uncut_{c}" for c in CATEGORIES),
)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """A job's ``csv/metrics.csv``, one row per step (the step's first value of each column)."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run_dir must be a training job's folder")
    return pd.read_csv(path).groupby("step", as_index=False).first()


def summary_check(run_dir: str | Path, table: pd.DataFrame) -> str | None:
    """The recovered totals (cut rows, cut on derailed prefixes, dropped tokens) beside the
    exact ones the run summed (``summary.json``'s ``cut_verdicts``); None without them."""
    path = Path(run_dir) / "summary.json"
    verdicts = json.loads(path.read_text()).get("cut_verdicts") if path.exists() else None
    if not verdicts:
        return None
    exact = verdicts["n_dropped_derailed"] + verdicts["n_dropped_valid"]
    return (
        f"recovered from the shares / logged exactly (summary.json): cut rows "
        f"{table['cut'].sum():.0f} / {verdicts['n_cut']:.0f}, cut on derailed prefixes "
        f"{table['cut_derailed'].sum():.0f} / {verdicts['n_cut_derailed']:.0f}, dropped tokens "
        f"{table['dropped'].sum():.0f} / {exact:.0f}"
    )


def _zero(x: pd.Series) -> pd.Series:
    return x.fillna(0.0)


def step_counts(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per training step: ``step``, ``threshold``, ``active`` and the :data:`COUNTS` (module
    docstring). Steps without a logged rollout (no ``len/generated``) are left out."""
    need = ["step", "len/generated", "len/kept", "total/tokens_generated"]
    missing = [c for c in need if c not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}: not a training job's metrics.csv")
    m = metrics.dropna(subset=["len/generated"]).sort_values("step").reset_index(drop=True)
    tokens = m["total/tokens_generated"].diff().fillna(m["total/tokens_generated"])
    rows = (tokens / m["len/generated"]).round()
    out = pd.DataFrame({"step": m["step"].astype(int), "rows": rows})
    out["threshold"] = m["kat/threshold"] if "kat/threshold" in m else math.nan
    out["active"] = _zero(m["kat/active"]) if "kat/active" in m else 0.0
    out["generated"] = rows * m["len/generated"]
    out["kept"] = rows * m["len/kept"]
    share = lambda name: _zero(m[name]) if name in m else 0.0 * rows  # noqa: E731
    out["cut"] = (share("verdict/cut_rows") * rows).round()
    out["cut_derailed"] = (share("verdict/cut_on_derailed") * out["cut"]).round()
    out["dropped"] = out["generated"] - out["kept"]
    out["dropped_derailed"] = share("verdict/dropped_on_derailed") * out["dropped"]
    for c in CATEGORIES:
        out[f"uncut_{c}"] = (share(f"verdict/uncut_{c}") * (rows - out["cut"])).round()
    return out


def phase_table(
    steps: pd.DataFrame, phases: int, reference: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The :func:`step_counts` summed over ``phases`` equal ranges of steps, with the phase's
    threshold (mean, min, max over active steps), shares (Wilson 95% where a count of rows) and,
    given a ``reference`` run's step counts, the tokens saved against it."""
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    lo, hi = int(steps["step"].min()), int(steps["step"].max())
    edges = [lo + (hi + 1 - lo) * i / phases for i in range(phases + 1)]
    label = pd.cut(steps["step"], edges, right=False, include_lowest=True, labels=False)
    records = []
    for p, part in steps.groupby(label):
        sums = part[list(COUNTS)].sum()
        active = part[part["active"] > 0]["threshold"]
        first, last = int(part["step"].min()), int(part["step"].max())
        cut, derailed = int(sums["cut"]), int(sums["cut_derailed"])
        lo_ci, hi_ci = wilson_interval(derailed, cut)
        uncut = sums[[f"uncut_{c}" for c in CATEGORIES]].sum()
        record = {
            "phase": int(p) + 1,
            "steps": f"{first}-{last}",
            "active_steps": len(active),
            "threshold_mean": active.mean() if len(active) else math.nan,
            "threshold_min": active.min() if len(active) else math.nan,
            "threshold_max": active.max() if len(active) else math.nan,
            **{k: float(sums[k]) for k in COUNTS},
            "generated_per_rollout": sums["generated"] / sums["rows"],
            "kept_per_rollout": sums["kept"] / sums["rows"],
            "cut_share": cut / sums["rows"],
            "cut_on_derailed": derailed / cut if cut else math.nan,
            "cut_on_derailed_lo": lo_ci,
            "cut_on_derailed_hi": hi_ci,
            "dropped_on_derailed": (
                sums["dropped_derailed"] / sums["dropped"] if sums["dropped"] else math.nan
            ),
            **{
                f"uncut_{c}_share": sums[f"uncut_{c}"] / uncut if uncut else math.nan
                for c in CATEGORIES
            },
        }
        if reference is not None:
            ref = reference[reference["step"].between(first, last)]
            ref_mean = ref["generated"].sum() / ref["rows"].sum() if len(ref) else math.nan
            record["reference_generated_per_rollout"] = ref_mean
            record["saved"] = (ref_mean - record["generated_per_rollout"]) * sums["rows"]
        records.append(record)
    table = pd.DataFrame(records).set_index("phase")
    if reference is not None:
        table["saved_share"] = table["saved"] / table["saved"].sum()
    return table


def _f(x: float, fmt: str = ".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(table: pd.DataFrame, header: list[str]) -> str:
    """The phase table with its header lines and the benchmark override of its thresholds."""
    has_ref = "saved" in table
    cols = [
        "phase (steps)",
        "threshold mean [min, max] (active steps)",
        "rollouts",
        "generated / rollout",
        "kept / rollout",
        "cut",
        "cut on derailed prefix [95% CI]",
        "dropped tokens (on derailed)",
        "uncut: correct / wrong / degenerate / capped",
    ]
    if has_ref:
        cols += ["reference generated / rollout", "saved tokens (share)"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for phase, r in table.iterrows():
        cells = [
            f"{phase} ({r['steps']})",
            f"{_f(r['threshold_mean'], '.4g')} [{_f(r['threshold_min'], '.4g')}, "
            f"{_f(r['threshold_max'], '.4g')}] ({r['active_steps']})",
            f"{r['rows']:.0f}",
            _f(r["generated_per_rollout"]),
            _f(r["kept_per_rollout"]),
            f"{r['cut']:.0f} ({_f(r['cut_share'], '.2f')})",
            f"{_f(r['cut_on_derailed'], '.2f')} [{_f(r['cut_on_derailed_lo'], '.2f')}, "
            f"{_f(r['cut_on_derailed_hi'], '.2f')}]",
            f"{r['dropped']:.0f} ({_f(r['dropped_on_derailed'], '.2f')})",
            " / ".join(_f(r[f"uncut_{c}_share"], ".2f") for c in CATEGORIES),
        ]
        if has_ref:
            cells += [
                _f(r["reference_generated_per_rollout"]),
                f"{r['saved']:.0f} ({_f(r['saved_share'], '.2f')})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    thresholds = [f"{t:.4g}" for t in table["threshold_mean"] if not math.isnan(t)]
    if thresholds:
        lines += [
            "",
            "The fixed-threshold sweep at these thresholds, on one set of rollouts: "
            f"`python -m kat_research.analysis.termination_benchmark "
            f"'kat_thresholds=[{','.join(thresholds)}]'`",
        ]
    return "\n".join(lines)


def run(cfg: DictConfig, command: str) -> pd.DataFrame:
    """The analysis ``cfg`` (conf/analysis_kat_threshold.yaml) describes; its phase table."""
    steps = step_counts(read_metrics(cfg.run_dir))
    if not (steps["active"] > 0).any():
        raise ValueError(f"{cfg.run_dir} logged no active KAT threshold (kat/active): a KAT run?")
    reference = step_counts(read_metrics(cfg.reference_dir)) if cfg.reference_dir else None
    table = phase_table(steps, int(cfg.phases), reference)
    header = [
        *([f"**{cfg.label}**", ""] if cfg.label else []),
        f"command: `{command}`",
        f"commit: {code_commit()}",
        f"run: {cfg.run_dir}" + (f"; reference: {cfg.reference_dir}" if cfg.reference_dir else ""),
        "",
        "Counts recovered from the run's logged means and shares (csv/metrics.csv). A cut row's "
        "kept prefix is derailed when it holds the verifier's first error; dropped tokens are "
        "those generated after the cut (the detection lag), on derailed or valid prefixes.",
    ]
    check = summary_check(cfg.run_dir, table)
    if check:
        header.append(check)
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(table, header)
    report.with_suffix(".md").write_text(text + "\n")
    table.to_csv(report.with_suffix(".csv"))
    print(text)
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analysis_kat_threshold")
def main(cfg: DictConfig) -> None:
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    overrides = list(HydraConfig.get().overrides.task)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(cfg, shlex.join(["python", "-m", "kat_research.analysis.kat_threshold", *overrides]))


if __name__ == "__main__":
    main()
