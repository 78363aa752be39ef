"""Evaluators of the tasks generated in code (the arithmetic task, the collatz and running-sum
testbed tasks): callables that generate with a model, grade, and return metrics plus records."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data import running_sum
from kat_research.data.collatz import CollatzTaskConfig, verify
from kat_research.data.prompts import format_prompt
from kat_research.data.sources import SourceSpec, load_rows
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
    """Accuracy on ``n_problems`` held-out problems of a task generated in code (its
    ``data.source`` kind is the evaluator's ``name``, its settings a ``task_type``): generate
    ``n_samples`` completions per problem (greedy by default), grade them with :meth:`grade`,
    report :func:`accuracy_metrics`. Subclasses set the task and the grading, and the defaults
    that fit their solutions (``default_problems``, ``default_max_new_tokens``)."""

    name = ""
    task_type: type = ArithmeticTaskConfig
    default_problems = 32
    default_max_new_tokens = 256

    def __init__(
        self,
        n_problems: int | None = None,
        seed: int = 0,
        task: dict | object | None = None,
        instruction: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 64,
    ):
        self.task = task if isinstance(task, self.task_type) else self.task_type(**(task or {}))
        n = self.default_problems if n_problems is None else n_problems
        self.rows, _ = load_rows(
            SourceSpec(kind=self.name, split="eval", n=n, seed=seed, task=self.task)
        )
        self.instruction = instruction
        self.max_new_tokens = (
            self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        )
        self.temperature, self.top_p = temperature, top_p
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
    task_type = ArithmeticTaskConfig
    default_problems = 256
    default_max_new_tokens = 64

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
    task_type = CollatzTaskConfig

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
        n_valid = running_sum.verify(problem, record.completion, task).n_valid - task.start_line
        shares.append(min(max(n_valid, 0), len(problem.items)) / len(problem.items))
    return sum(shares) / max(1, len(shares))


class RunningSumEvaluator(HeldOutEvaluator):
    """Accuracy (greedy by default) on ``n_problems`` held-out problems; a completion is correct
    when every line adds the next item to the previous total (any phrasing) and the last line
    boxes the total (``data.running_sum.verify``). ``answer`` in the records is the
    completion's last box."""

    name = "running_sum"
    task_type = running_sum.RunningSumConfig
    default_max_new_tokens = 512

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
