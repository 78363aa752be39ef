"""Evaluation: benchmarks, grading and avg@k / pass@k summaries (answer extraction lives in
``kat_research.text``)."""

from kat_research.eval.benchmarks import BENCHMARKS, Problem, load_benchmark
from kat_research.eval.grading import Grader
from kat_research.eval.metrics import PAPER_BENCHMARKS, macro_average, pass_at_k, summarize

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "Grader",
    "Problem",
    "load_benchmark",
    "macro_average",
    "pass_at_k",
    "summarize",
]
