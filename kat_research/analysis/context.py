"""What every checkpoint analysis sets up from its config: the run, its models, the detector and
a fixed prompt set (the same prompts for every checkpoint, so checkpoints compare pairwise)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kat_research.analysis.detector import resolve_threshold
from kat_research.analysis.rollouts import RolloutSpec, prompt_batches, sample_rollouts
from kat_research.analysis.runs import (
    TrainingRun,
    initial_state,
    kat_buffer,
    load_run,
    load_student,
    read_checkpoint,
    run_module,
    student_state,
)
from kat_research.lit import OPDModule
from kat_research.models import pick_device
from kat_research.rollout import Rollout
from kat_research.termination import KATRule, kat_rule_from_settings


@dataclass
class AnalysisContext:
    run: TrainingRun
    module: OPDModule
    init: dict[str, torch.Tensor]
    detector: KATRule  # the run's rule with the analysis's overrides (analysis.detector)
    spec: RolloutSpec
    batches: list[dict]
    threshold_from: float | str | None  # None: the analysis picks buffers itself

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AnalysisContext:
        """Keys used: ``run_dir``, ``device``, ``threshold_from`` (optional),
        ``analysis.detector``, ``analysis.rollouts``."""
        run = load_run(cfg.run_dir)
        module = run_module(run.cfg, pick_device(cfg.device))
        spec = RolloutSpec(**OmegaConf.to_container(cfg.analysis.rollouts, resolve=True))
        detector = kat_rule_from_settings(
            OmegaConf.to_container(run.cfg.termination.kat, resolve=True),
            OmegaConf.to_container(cfg.analysis.detector, resolve=True),
        )
        return cls(
            run=run,
            module=module,
            init=initial_state(module),
            detector=detector,
            spec=spec,
            batches=prompt_batches(run.cfg, module.tokenizer, spec),
            threshold_from=cfg.get("threshold_from"),
        )

    def use(self, spec: float | str) -> str:
        """Load the student of checkpoint ``spec`` (see ``TrainingRun.checkpoint``); its label."""
        label, path = self.run.checkpoint(spec)
        load_student(self.module, path, self.init)
        return label

    def rollouts(self, label: str, **engine: Any) -> Iterator[Rollout]:
        """Rollouts of the current student over the prompt set, progress lines labelled
        ``label`` (``sample_rollouts`` kwargs)."""
        return sample_rollouts(self.module, self.batches, self.spec, label=label, **engine)

    def weights(self, spec: float | str) -> dict[str, torch.Tensor]:
        """The student's weights at checkpoint ``spec`` (CPU), without loading them."""
        _, path = self.run.checkpoint(spec)
        return self.init if path is None else student_state(read_checkpoint(path))

    def resolved_detector(
        self, traces: Callable[[], Sequence[torch.Tensor]]
    ) -> tuple[KATRule, str]:
        """The detector with its threshold: fixed, else the quantile of the KAT buffer of
        checkpoint ``threshold_from``, else of the minima of ``traces()`` (called only then)."""
        if self.threshold_from is None:
            raise ValueError(
                "set threshold_from: the checkpoint whose KAT buffer sets the threshold"
            )
        return resolve_threshold(self.detector, self.kat_buffer(self.threshold_from), traces)

    def kat_buffer(self, spec: float | str) -> torch.Tensor | None:
        """The KAT buffer saved in checkpoint ``spec`` (None: ``init``, or a run without KAT)."""
        _, path = self.run.checkpoint(spec)
        return None if path is None else kat_buffer(read_checkpoint(path).get("terminator"))


def kl_traces(rollout: Rollout) -> list[torch.Tensor]:
    """Per-row KL over each row's generated tokens (float64, CPU)."""
    return [rollout.kl[b, :n].double().cpu() for b, n in enumerate(rollout.lengths.tolist())]


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
