"""Evaluators of the tasks generated in code (the arithmetic task, the collatz testbed task):
callables that generate with a model, grade, and return metrics plus records."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data import running_sum
from kat_research.data.collatz import CollatzTaskConfig, verify
from kat_research.data.prompts import format_prompt
from kat_research.data.sources import Row, SourceSpec, load_rows
from kat_research.data.synthetic import ArithmeticTaskConfig, exact_integer_match
from kat_research.eval.runner import (
    Completion,
    SampleRecord,
    generate_completions,
    grade_completions,
)
from kat_research.rollout import SamplingConfig
from kat_research.text.answers import last_boxed


@dataclass
class EvalResult:
    """Scalar metrics (``<task>/<name>``) and the graded samples behind them."""

    metrics: dict[str, float]
    records: list[SampleRecord] = field(default_factory=list)


def accuracy_metrics(name: str, records: list[SampleRecord]) -> dict[str, float]:
    """Mean accuracy, mean length and stop-reason shares over ``records``."""
    n = max(1, len(records))
    return {
        f"{name}/accuracy": sum(r.correct for r in records) / n,
        f"{name}/mean_length": sum(r.length for r in records) / n,
        f"{name}/eos_share": sum(r.stop_reason == "eos" for r in records) / n,
    }


class HeldOutEvaluator:
    """Accuracy on the held-out rows of a task generated in code: generate ``n_samples``
    completions per row (greedy by default), grade them with :meth:`grade`, report
    :func:`accuracy_metrics`. Subclasses load their rows and define the grading."""

    name = ""

    def __init__(
        self,
        rows: list[Row],
        *,
        instruction: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        n_samples: int,
        batch_size: int,
        seed: int,
    ):
        self.rows = rows
        self.instruction = instruction
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed

    def grade(self, completions: list[Completion]) -> list[SampleRecord]:
        """The graded records of ``completions`` (``n_samples`` per row, in row order)."""
        raise NotImplementedError

    def __call__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> EvalResult:
        prompts = [format_prompt(tokenizer, r.problem, self.instruction) for r in self.rows]
        sampling = SamplingConfig(
            self.temperature, self.top_p, self.max_new_tokens, (tokenizer.eos_token_id,)
        )
        completions = generate_completions(
            model,
            tokenizer,
            prompts,
            sampling=sampling,
            n_samples=self.n_samples,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        records = self.grade(completions)
        return EvalResult(accuracy_metrics(self.name, records), records)


class SyntheticEvaluator(HeldOutEvaluator):
    """Accuracy on the held-out split of the built-in arithmetic task (greedy by default).

    A completion is correct when its last box holds exactly the gold integer
    (``data.synthetic.exact_integer_match``); ``answer`` in the records is that box's content.
    """

    name = "synthetic"

    def __init__(
        self,
        n_problems: int = 256,
        seed: int = 0,
        task: dict | ArithmeticTaskConfig | None = None,
        instruction: str = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 64,
    ):
        task_cfg = (
            task if isinstance(task, ArithmeticTaskConfig) else ArithmeticTaskConfig(**(task or {}))
        )
        rows, _ = load_rows(
            SourceSpec(kind="synthetic", split="eval", n=n_problems, seed=seed, task=task_cfg)
        )
        super().__init__(
            rows,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
        )

    def grade(self, completions: list[Completion]) -> list[SampleRecord]:
        return grade_completions(
            self.name,
            [r.problem_id for r in self.rows],
            [r.answer for r in self.rows],
            completions,
            extract=last_boxed,
            grade_many=lambda pairs: [exact_integer_match(a, g) for a, g in pairs],
        )


class CollatzEvaluator(HeldOutEvaluator):
    """Greedy (by default) accuracy on ``n_problems`` held-out starts; a completion is correct
    when every line is a valid step and it ends with the box of the last value
    (``data.collatz.verify``). ``answer`` in the records is the completion's last box."""

    name = "collatz"

    def __init__(
        self,
        n_problems: int = 32,
        seed: int = 0,
        task: dict | CollatzTaskConfig | None = None,
        instruction: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 64,
    ):
        self.task = (
            task if isinstance(task, CollatzTaskConfig) else CollatzTaskConfig(**(task or {}))
        )
        rows, _ = load_rows(
            SourceSpec(kind="collatz", split="eval", n=n_problems, seed=seed, task=self.task)
        )
        super().__init__(
            rows,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
        )

    def grade(self, completions: list[Completion]) -> list[SampleRecord]:
        records = grade_completions(
            self.name,
            [r.problem_id for r in self.rows],
            [r.problem for r in self.rows],  # the gold is the start: the verifier needs it
            completions,
            extract=lambda text: text,
            grade_many=lambda pairs: [
                verify(start, text, self.task).correct for text, start in pairs
            ],
        )
        return [replace(r, answer=last_boxed(r.completion)) for r in records]


def valid_line_share(
    problems: dict[str, str], records: list[SampleRecord], task: running_sum.RunningSumConfig
) -> float:
    """Mean over ``records`` of the share of their problem's item lines that are valid before
    the first error (``problems``: problem id -> problem text)."""
    shares = []
    for record in records:
        problem = running_sum.parse_problem(problems[record.problem_id])
        n_valid = running_sum.verify(problem, record.completion, task).n_valid
        shares.append(min(n_valid, len(problem.items)) / len(problem.items))
    return sum(shares) / max(1, len(shares))


class RunningSumEvaluator(HeldOutEvaluator):
    """Accuracy (greedy by default) on ``n_problems`` held-out problems; a completion is correct
    when every line adds the next item to the previous total (any phrasing) and the last line
    boxes the total (``data.running_sum.verify``). ``answer`` in the records is the
    completion's last box."""

    name = "running_sum"

    def __init__(
        self,
        n_problems: int = 32,
        seed: int = 0,
        task: dict | running_sum.RunningSumConfig | None = None,
        instruction: str = "",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 64,
    ):
        self.task = (
            task
            if isinstance(task, running_sum.RunningSumConfig)
            else running_sum.RunningSumConfig(**(task or {}))
        )
        rows, _ = load_rows(
            SourceSpec(kind="running_sum", split="eval", n=n_problems, seed=seed, task=self.task)
        )
        super().__init__(
            rows,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
        )

    def __call__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> EvalResult:
        """The held-out metrics plus ``running_sum/valid_line_share``: the mean share of a
        problem's item lines written correctly before the first error (progress that exact
        accuracy does not show yet)."""
        result = super().__call__(model, tokenizer)
        result.metrics[f"{self.name}/valid_line_share"] = valid_line_share(
            {r.problem_id: r.problem for r in self.rows}, result.records, self.task
        )
        return result

    def grade(self, completions: list[Completion]) -> list[SampleRecord]:
        records = grade_completions(
            self.name,
            [r.problem_id for r in self.rows],
            [r.problem for r in self.rows],  # the gold is the problem: the verifier needs it
            completions,
            extract=lambda text: text,
            grade_many=lambda pairs: [
                running_sum.verify(problem, text, self.task).correct for text, problem in pairs
            ],
        )
        return [replace(r, answer=last_boxed(r.completion)) for r in records]
