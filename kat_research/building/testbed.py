"""How the long-horizon testbed's teacher and students come about, like real base and instruct
models: pre-training on copy-rich documents (``data.collatz.pretraining_documents``), then
SFT on worked solutions with a share of those documents kept in the mixture.

``collatz_setup`` (and ``running_sum_setup`` for ``data.running_sum``) gives
``building.models.train_sft_model`` the data of both phases and the held-out evaluator; the
``sft`` settings it reads beyond the arithmetic models' are ``pretrain_steps``,
``n_documents``, ``copy_fraction``, ``eval_problems`` and the optional ``form_weights``
(the model's phrasing style: odds of the three forms in its training text; teacher and
student may differ, as real model pairs differ in style).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from kat_research.building.token_mixture import (
    ExampleDataModule,
    document_examples,
    mix,
    sft_examples,
)
from kat_research.data import running_sum
from kat_research.data.collatz import CollatzTaskConfig, pretraining_documents
from kat_research.data.running_sum import RunningSumConfig
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.eval.tasks import CollatzEvaluator, RunningSumEvaluator
from kat_research.models import LoadedModel, load_causal_lm

META_FILE = "demo_model.json"  # how a saved testbed or demo model was trained

# Longest training sequence: a document of max_chars plus eos, or a prompt plus a solution.
_MARGIN = 32


@dataclass(frozen=True)
class TaskSetup:
    """The SFT data, the held-out evaluator and the pre-training data (None: no pre-training)."""

    data: L.LightningDataModule
    evaluator: Any
    pretrain: L.LightningDataModule | None


def _setup(
    tokenizer: Any,
    sft: dict[str, Any],
    documents: list[str],
    source: SourceSpec,
    evaluator: Any,
    max_length: int,
) -> TaskSetup:
    """Pre-training on ``documents``; SFT on a mixture drawing a document with probability
    ``copy_fraction`` and a worked solution of ``source`` otherwise."""
    batch = sft["batch_size"]
    examples = document_examples(tokenizer, documents)
    rows, _ = load_rows(source)
    mixture = mix(
        [
            (sft_examples(tokenizer, rows), 1 - sft["copy_fraction"]),
            (examples, sft["copy_fraction"]),
        ],
        n=sft["steps"] * batch,
        seed=sft["seed"],
    )
    pad = tokenizer.pad_token_id
    pretrain = (
        ExampleDataModule(examples, pad, batch, max_length, sft["seed"])
        if sft["pretrain_steps"] > 0
        else None
    )
    return TaskSetup(
        ExampleDataModule(mixture, pad, batch, max_length, sft["seed"]), evaluator, pretrain
    )


def collatz_setup(tokenizer: Any, sft: dict[str, Any], task: dict[str, Any]) -> TaskSetup:
    """The collatz task's ``n_documents`` copy-rich documents and worked solutions."""
    cfg = CollatzTaskConfig(**{**task, "form_weights": sft.get("form_weights", (1, 1, 1))})
    seed = sft["seed"]
    return _setup(
        tokenizer,
        sft,
        pretraining_documents(sft["n_documents"], seed, cfg),
        SourceSpec(kind="collatz", n=sft["n_problems"], seed=seed, task=cfg),
        CollatzEvaluator(n_problems=sft["eval_problems"], task=cfg),
        cfg.max_chars + _MARGIN,
    )


def running_sum_setup(tokenizer: Any, sft: dict[str, Any], task: dict[str, Any]) -> TaskSetup:
    """The running-total task's copy-rich documents and worked solutions (``data.running_sum``;
    every document and solution fits in ``max_chars``)."""
    cfg = RunningSumConfig(**{**task, "form_weights": sft.get("form_weights", (1, 1, 1))})
    seed = sft["seed"]
    return _setup(
        tokenizer,
        sft,
        running_sum.pretraining_documents(sft["n_documents"], seed, cfg),
        SourceSpec(kind="running_sum", n=sft["n_problems"], seed=seed, task=cfg),
        RunningSumEvaluator(n_problems=sft["eval_problems"], task=cfg),
        cfg.max_chars + _MARGIN,
    )


def shipped_model(path: str, trainable: bool = True) -> LoadedModel:
    """Load one of the testbed's shipped models (``assets/testbed/<name>``).

    They are committed so that the demo and the tiny-scale tables start at once; their
    ``demo_model.json`` records how each was trained and ``make testbed-models`` rebuilds them
    (``conf/testbed_models.yaml``)."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(
            f"no testbed model at {folder}: set KAT_ASSETS_DIR / paths.assets_dir to the folder "
            "holding testbed/, or rebuild the models with `make testbed-models`"
        )
    return load_causal_lm(str(folder), trainable=trainable)
