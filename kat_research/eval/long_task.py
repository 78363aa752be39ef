"""Accuracy on the held-out split of the long-horizon task, graded by its chain verifier."""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.long_task import CollatzTaskConfig, verify
from kat_research.data.prompts import format_prompt
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.runner import generate_completions, grade_completions
from kat_research.eval.tasks import EvalResult, accuracy_metrics
from kat_research.rollout import SamplingConfig
from kat_research.text.answers import last_boxed


class CollatzEvaluator:
    """Greedy (by default) accuracy on ``n_problems`` held-out starts; a completion is correct
    when every line is a valid step and it ends with the box of the last value
    (``data.long_task.verify``). ``answer`` in the records is the completion's last box."""

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
        self.rows, _ = load_rows(
            SourceSpec(kind="collatz", split="eval", n=n_problems, seed=seed, task=self.task)
        )
        self.instruction = instruction
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed

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
        records = [replace(r, answer=last_boxed(r.completion)) for r in records]
        return EvalResult(accuracy_metrics(self.name, records), records)
