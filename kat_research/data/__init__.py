"""Training data: the synthetic arithmetic task, row sources, chat prompts and the data module."""

from kat_research.data.datamodule import PromptDataModule
from kat_research.data.prompts import (
    DEFAULT_INSTRUCTION,
    PromptCollator,
    SFTCollator,
    drop_too_long,
    format_prompt,
)
from kat_research.data.readers import LoadStats
from kat_research.data.sources import Row, SourceSpec, load_rows
from kat_research.data.synthetic import (
    ArithmeticProblem,
    ArithmeticTaskConfig,
    exact_integer_match,
    make_problem,
    solution_text,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ArithmeticProblem",
    "ArithmeticTaskConfig",
    "LoadStats",
    "PromptCollator",
    "PromptDataModule",
    "Row",
    "SFTCollator",
    "SourceSpec",
    "drop_too_long",
    "exact_integer_match",
    "format_prompt",
    "load_rows",
    "make_problem",
    "solution_text",
]
