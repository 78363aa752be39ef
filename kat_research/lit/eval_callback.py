"""Run an evaluator on the student during training: at the start, every N steps, at the end;
optionally stop training once the evaluation reaches a target."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L

from kat_research.eval.tasks import EvalResult
from kat_research.layout import eval_file, write_samples


class EvalCallback(L.Callback):
    """Evaluates ``pl_module.student`` with ``evaluator(model, tokenizer) -> EvalResult``.

    Metrics go to every logger at the current global step and into ``results`` (step →
    metrics); graded samples are written to ``<output_dir>/eval/step<N>.jsonl``. With several
    ranks only rank 0 evaluates (the others wait; their ``results`` hold empty metrics), on
    weights gathered by the module's ``full_student()`` context when it has one (FSDP). With
    ``stop_when`` (metric → minimum), training stops after the first evaluation in which every
    listed metric reaches its minimum (``stopped_at`` holds that step). An evaluator that
    samples with vLLM (``eval.backend=vllm``) pushes the student's current weights into its
    engine at each call, as the rollouts do after each optimizer step; with vLLM rollouts it
    uses their engine.
    """

    def __init__(
        self,
        evaluator: Callable[..., EvalResult],
        output_dir: str | Path | None = None,
        every_n_steps: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        stop_when: Mapping[str, float] | None = None,
    ):
        self.evaluator = evaluator
        self.output_dir = Path(output_dir) if output_dir else None
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.stop_when = dict(stop_when or {})
        self.results: dict[int, dict[str, float]] = {}
        self.stopped_at: int | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        step = trainer.global_step
        if step in self.results:
            return self.results[step]
        metrics: dict[str, float] = {}
        with getattr(pl_module, "full_student", nullcontext)():
            if trainer.is_global_zero:
                metrics = self._evaluate(trainer, pl_module, step)
        trainer.strategy.barrier("eval")
        self.results[step] = metrics
        return metrics

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> dict[str, float]:
        model = pl_module.student
        was_training = model.training
        model.eval()
        try:
            result = self.evaluator(model, pl_module.tokenizer)
        finally:
            model.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
        if self.output_dir is not None:
            write_samples(eval_file(self.output_dir, step), result.records)
        return result.metrics

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            metrics = self.evaluate(trainer, pl_module)
            if self.stop_when:  # rank 0 evaluated: its verdict is every rank's
                reached = trainer.is_global_zero and target_reached(metrics, self.stop_when)
                if trainer.strategy.broadcast(reached, src=0):
                    self.stopped_at = trainer.global_step
                    trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results), "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {int(k): v for k, v in state_dict["results"].items()}
        self.stopped_at = state_dict.get("stopped_at")


def target_reached(metrics: Mapping[str, float], minimums: Mapping[str, float]) -> bool:
    """Whether every metric named in ``minimums`` is at least its minimum (a missing one is
    an error: a misspelt target would otherwise never stop training)."""
    missing = sorted(set(minimums) - set(metrics))
    if missing:
        raise KeyError(f"stop_when names metrics the evaluator does not report: {missing}")
    return all(metrics[name] >= value for name, value in minimums.items())
