"""Text utilities shared by the data sources and the evaluators (a leaf: imports nothing from
the package)."""

from kat_research.text.answers import after_hashes, extract_answer, gold_from_solution, last_boxed

__all__ = ["after_hashes", "extract_answer", "gold_from_solution", "last_boxed"]
