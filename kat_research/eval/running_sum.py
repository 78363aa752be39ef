"""Accuracy on the held-out split of the running-total task, graded by its line verifier."""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.running_sum import RunningSumConfig, parse_problem, verify
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.runner import Completion, SampleRecord, grade_completions
from kat_research.eval.tasks import EvalResult, HeldOutEvaluator
from kat_research.text.answers import last_boxed


def valid_line_share(
    problems: dict[str, str], records: list[SampleRecord], task: RunningSumConfig
) -> float:
    """Mean over ``records`` of the share of their problem's item lines that are valid before
    the first error (``problems``: problem id -> problem text)."""
    shares = []
    for record in records:
        problem = parse_problem(problems[record.problem_id])
        n_valid = verify(problem, record.completion, task).n_valid
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
        task: dict | RunningSumConfig | None = None,
        instruction: str = "",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n_samples: int = 1,
        batch_size: int = 64,
    ):
        self.task = task if isinstance(task, RunningSumConfig) else RunningSumConfig(**(task or {}))
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
                verify(problem, text, self.task).correct for text, problem in pairs
            ],
        )
        return [replace(r, answer=last_boxed(r.completion)) for r in records]
