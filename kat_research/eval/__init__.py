"""Evaluation: benchmarks, answer extraction, grading and avg@k / pass@k summaries."""

from kat_research.eval.answers import extract_answer
from kat_research.eval.benchmarks import BENCHMARKS, Problem, load_benchmark
from kat_research.eval.grading import Grader, is_equivalent
from kat_research.eval.metrics import PAPER_BENCHMARKS, macro_average, pass_at_k, summarize

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "Grader",
    "Problem",
    "extract_answer",
    "is_equivalent",
    "load_benchmark",
    "macro_average",
    "pass_at_k",
    "summarize",
]
