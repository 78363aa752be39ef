"""avg@k, pass@k and per-benchmark summaries of graded samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

import pandas as pd

PAPER_BENCHMARKS = ("amc23", "math500", "minerva_math", "aime24")
METRICS = ("avg@k", "pass@k", "mean_length")
RECORD_FIELDS = ("benchmark", "problem_id", "correct", "length")


def _check_counts(n: int, c: int) -> None:
    if n < 1 or c < 0 or c > n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms large binomials.
    """
    _check_counts(n, c)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(n: int, c: int) -> float:
    """avg@k of one problem: the fraction of its n samples that are correct."""
    _check_counts(n, c)
    return c / n


def records_frame(records: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Graded samples as a DataFrame; each record needs every key of ``RECORD_FIELDS``."""
    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if frame.empty:
        raise ValueError("no records to summarise")
    absent = [name for name in RECORD_FIELDS if name not in frame.columns]
    if absent:
        raise ValueError(f"records lack fields {absent}; need {list(RECORD_FIELDS)}")
    frame = frame[list(RECORD_FIELDS)]
    if frame.isna().any().any():
        raise ValueError("records have empty values in " + str(list(RECORD_FIELDS)))
    return frame.astype({"correct": bool})


def per_problem(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (benchmark, problem_id) of ``records_frame`` output: samples n, correct c."""
    grouped = frame.groupby(["benchmark", "problem_id"], sort=True)["correct"]
    return grouped.agg(n="size", c="sum").reset_index()


def _samples_per_problem(benchmark: str, n: pd.Series, k: int | Mapping[str, int] | None) -> int:
    """The k of one benchmark: given, or its (uniform) number of samples per problem."""
    chosen = k.get(benchmark) if isinstance(k, Mapping) else k
    if chosen is not None:
        return chosen
    if n.nunique() != 1:
        raise ValueError(
            f"{benchmark}: problems have different sample counts {sorted(n.unique().tolist())}; "
            "pass k explicitly"
        )
    return int(n.iloc[0])


def summarize(
    records: Iterable[Mapping[str, Any]] | pd.DataFrame,
    k: int | Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """Per-benchmark table indexed by benchmark: k, avg@k and pass@k (fractions in [0, 1]),
    mean_length (response tokens, mean over all samples), n_problems, n_samples.

    A record is one graded sample with the keys ``RECORD_FIELDS`` (``length`` in tokens; extra
    keys, as in the runner's per-sample records, are ignored). avg@k averages each
    problem's accuracy over its samples; pass@k averages the unbiased per-problem estimator.
    ``k`` (one value, or one per benchmark) defaults to the number of samples per problem,
    which must then be the same for every problem of a benchmark.
    """
    frame = records_frame(records)
    lengths = frame.groupby("benchmark")["length"].mean()
    rows = []
    for benchmark, group in per_problem(frame).groupby("benchmark", sort=True):
        bench_k = _samples_per_problem(benchmark, group["n"], k)
        counts = list(zip(group["n"].tolist(), group["c"].tolist(), strict=True))
        rows.append(
            {
                "benchmark": benchmark,
                "k": bench_k,
                "avg@k": fmean(avg_at_k(n, c) for n, c in counts),
                "pass@k": fmean(pass_at_k(n, c, bench_k) for n, c in counts),
                "mean_length": float(lengths[benchmark]),
                "n_problems": len(counts),
                "n_samples": sum(n for n, _ in counts),
            }
        )
    return pd.DataFrame(rows).set_index("benchmark")


def macro_average(
    summary: pd.DataFrame,
    benchmarks: Sequence[str] = PAPER_BENCHMARKS,
    allow_missing: bool = False,
) -> pd.Series:
    """Unweighted mean of ``METRICS`` over ``benchmarks`` (rows of ``summarize``'s output).

    Missing benchmarks raise ValueError, unless ``allow_missing``: then the mean is over those
    present and the ``missing`` entry names the others.
    """
    missing = tuple(name for name in benchmarks if name not in summary.index)
    if missing and not allow_missing:
        raise ValueError(
            f"macro average needs {list(benchmarks)}; missing {list(missing)} "
            "(pass allow_missing=True to average the others)"
        )
    present = [name for name in benchmarks if name in summary.index]
    values = {metric: summary.loc[present, metric].mean() for metric in METRICS}
    return pd.Series({**values, "n_benchmarks": len(present), "missing": missing}, name="macro")
