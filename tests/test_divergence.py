"""The divergence guard: NaN/inf logits, loss or gradient norm stop training with a message
naming the step, the quantity and the settings to change; finite bounds on the gradient norm and
the weights warn once; a teacher with NaN weights or overflowing outputs is reported as such."""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from kat_research.console import result_line
from kat_research.lit.divergence import (
    DivergenceGuard,
    DivergenceWarning,
    TrainingDivergedError,
    divergence_error,
    global_grad_norm,
    weight_abs_max,
)
from kat_research.models import build_char_tokenizer, save_tiny_model
from kat_research.models.vocab_check import (
    NonFiniteWeightsError,
    check_finite_weights,
    nonfinite_weights,
)
from kat_research.rollout import RolloutEngine, SamplingConfig, check_head_reproduces_logits
from kat_research.rollout.sampling import NonFiniteLogitsError, sample_next_token
from kat_research.training import job as training

NAN, INF = float("nan"), float("inf")


def train_recording_warnings(cfg) -> tuple[dict, list[str]]:
    """``train(cfg)``; the summary and the messages of the DivergenceWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = training.train(cfg)
    return summary, [str(w.message) for w in caught if w.category is DivergenceWarning]


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_sampling_refuses_nan_or_inf_logits(temperature, bad):
    logits = torch.zeros(3, 5)
    logits[1, 2] = bad
    with pytest.raises(NonFiniteLogitsError, match="logits of 1 of 3 rows hold NaN or inf"):
        sample_next_token(logits, temperature=temperature, top_p=1.0)


def test_sampling_takes_minus_inf_as_an_excluded_token_but_not_a_row_of_them():
    logits = torch.tensor([[-INF, 0.0, -INF], [-INF, -INF, 0.0]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = sample_next_token(logits, temperature=1.0, top_p=1.0, generator=generator)
        assert tokens.tolist() == [1, 2]
    with pytest.raises(NonFiniteLogitsError):
        sample_next_token(torch.full((1, 3), -INF), temperature=1.0, top_p=1.0)


# --------------------------------------------------------------------------- teacher weights


def poisoned(model: torch.nn.Module, name: str, value: float) -> torch.nn.Module:
    """A copy of ``model`` whose tensor ``name`` has ``value`` at index [0, 0]."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.get_parameter(name)[0, 0] = value
    return copied


DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"


def test_nonfinite_weights_are_found_and_named(tiny_pair):
    teacher = tiny_pair[1].model
    assert nonfinite_weights(teacher) == {}
    check_finite_weights("teacher", teacher)
    bad = poisoned(poisoned(teacher, DOWN_PROJ, NAN), "lm_head.weight", -INF)
    assert nonfinite_weights(bad) == {"model.embed_tokens.weight": 1, DOWN_PROJ: 1}  # tied head
    with pytest.raises(NonFiniteWeightsError, match=r"t holds 2 NaN/inf weight values, in model"):
        check_finite_weights("t", bad)


def test_teacher_with_a_nan_weight_is_reported_as_such_by_the_engine(tiny_pair, prompts):
    student, teacher = tiny_pair
    engine = RolloutEngine(
        student.model,
        poisoned(teacher.model, DOWN_PROJ, NAN),
        sampling=SamplingConfig(max_new_tokens=4),
        pad_token_id=student.tokenizer.pad_token_id,
    )
    with pytest.raises(NonFiniteWeightsError) as error:
        engine.generate(prompts.input_ids, prompts.attention_mask)
    assert f"teacher holds 1 NaN/inf weight values, in {DOWN_PROJ} (1)" in str(error.value)
    assert "post-processes" not in str(error.value)


def test_teacher_whose_activations_overflow_is_reported_as_such(tiny_pair):
    # every weight finite (float32 max ~3.4e38), but the final norm's output overflows to inf
    teacher = copy.deepcopy(tiny_pair[1].model)
    with torch.no_grad():
        teacher.model.norm.weight.fill_(3e38)
    assert nonfinite_weights(teacher) == {}
    with pytest.raises(ValueError, match="weights are finite: its activations overflow"):
        check_head_reproduces_logits(teacher, "teacher")


def test_training_with_a_nan_teacher_checkpoint_names_the_tensor(debug_config, tmp_path):
    folder = save_tiny_model(tmp_path / "nan_teacher", build_char_tokenizer(), hidden_size=64)
    weights = load_file(folder / "model.safetensors")
    weights[DOWN_PROJ][3, 5] = NAN
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = debug_config(
        tmp_path / "run",
        "model/teacher=qwen3_8b",
        f"model.teacher.name_or_path={folder}",
        "model.teacher.dtype=float32",
    )
    with pytest.raises(NonFiniteWeightsError, match=f"1 NaN/inf weight values, in {DOWN_PROJ}"):
        training.train(cfg)


# --------------------------------------------------------------------------- pure parts


def test_global_grad_norm_is_the_norm_of_all_gradients_together():
    a, b, frozen = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 4))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 12.0])
    assert float(global_grad_norm([a, b, frozen])) == pytest.approx(13.0)  # sqrt(9+16+144)
    assert float(global_grad_norm([frozen])) == 0.0


def test_weight_abs_max_per_tensor():
    named = [("a", torch.tensor([[1.0, -7.0]])), ("b", torch.tensor([0.5])), ("c", torch.ones(0))]
    assert weight_abs_max(named) == {"a": 7.0, "b": 0.5, "c": 0.0}


def test_divergence_message_names_step_quantity_and_settings():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    trainer = SimpleNamespace(
        global_step=7, optimizers=[optimizer], precision="16-mixed", gradient_clip_val=None
    )
    message = str(divergence_error(trainer, "the loss (train/loss) is nan"))
    assert message.startswith("training diverged at step 7: the loss (train/loss) is nan.")
    for part in (
        "optimizer.lr; the current rate is 0.25",
        "trainer.precision=16-mixed",
        "trainer.gradient_clip_val=null",
    ):
        assert part in message
    trainer.gradient_clip_val = 1.0  # clipping on: not a likely cause
    assert "gradient_clip_val" not in str(divergence_error(trainer, "x"))


@pytest.mark.parametrize("key", ["max_grad_norm", "max_weight_growth"])
def test_guard_bounds_must_be_positive(key):
    with pytest.raises(ValueError, match=f"callbacks.divergence_guard.{key} must be > 0"):
        DivergenceGuard(**{key: 0.0})


# --------------------------------------------------------------------------- training


def test_huge_learning_rate_stops_with_the_divergence_message(debug_config, tmp_path):
    cfg = debug_config(tmp_path, "method=opd", "optimizer.lr=1e10", "trainer.max_steps=4")
    with pytest.raises(TrainingDivergedError) as error:
        training.train(cfg)
    message = str(error.value)
    assert message.startswith(
        "training diverged at step 1: the student's logits are NaN or inf while sampling"
    )
    assert "optimizer.lr" in message and "trainer.precision=32-true" in message
    assert isinstance(error.value.__cause__, NonFiniteLogitsError)


def test_exploding_run_warns_once_and_healthy_run_stays_silent(debug_config, tmp_path):
    # optimizer.lr=1e3 keeps every value finite, but moves each weight by ~1e3 per step
    exploding = debug_config(tmp_path / "explode", "method=opd", "optimizer.lr=1e3", "logger=csv")
    summary, warned = train_recording_warnings(exploding)
    assert summary["steps"] == 2
    assert len(warned) == 1 and "step 1: the student's weight tensor" in warned[0]
    assert "max_weight_growth=10" in warned[0] and "optimizer.lr" in warned[0]
    # the result and summary.json say so, and the saturated student is not exported as good
    written = json.loads((tmp_path / "explode" / "summary.json").read_text())
    assert written["diverged"].startswith("step 1: the student's weight tensor")
    assert result_line(written).startswith("DIVERGED (step 1: ")
    assert not (tmp_path / "explode" / "student").exists()

    healthy = debug_config(tmp_path / "healthy", "method=opd", "logger=csv")
    summary, warned = train_recording_warnings(healthy)
    assert summary["steps"] == 2 and warned == [] and summary["diverged"] is None
    assert (tmp_path / "healthy" / "student" / "config.json").exists()
    metrics = pd.read_csv(tmp_path / "healthy" / "csv" / "metrics.csv")
    assert metrics["train/grad_norm"].dropna().between(0, 1000, inclusive="neither").all()


def test_gradient_norm_bound_warns_once(debug_config, tmp_path):
    cfg = debug_config(
        tmp_path, "method=opd", "logger=csv", "callbacks.divergence_guard.max_grad_norm=1e-6"
    )
    _, warned = train_recording_warnings(cfg)
    assert len(warned) == 1
    assert "the gradient norm before clipping is" in warned[0]
    assert "above callbacks.divergence_guard.max_grad_norm=1e-06" in warned[0]


def wrap_loss(monkeypatch: pytest.MonkeyPatch, change) -> None:
    """Make the module's loss ``change(loss)`` (the rollout and the loss itself stay real)."""
    original = training.OPDModule.distillation_loss

    def distillation_loss(self, rollout):
        out = original(self, rollout)
        out.loss = change(out.loss)
        return out

    monkeypatch.setattr(training.OPDModule, "distillation_loss", distillation_loss)


def test_nan_loss_stops_before_the_backward_pass(debug_config, tmp_path, monkeypatch):
    wrap_loss(monkeypatch, lambda loss: loss * NAN)
    with pytest.raises(TrainingDivergedError, match=r"at step 0: the loss \(train/loss\) is nan"):
        training.train(debug_config(tmp_path, "method=opd"))


def test_nan_gradient_stops_training(debug_config, tmp_path, monkeypatch):
    # value unchanged (0 * sqrt(0) = 0) but d/dloss = 0 * inf * 0 = NaN: NaN gradients only
    wrap_loss(monkeypatch, lambda loss: loss + 0.0 * torch.sqrt(0.0 * loss))
    with pytest.raises(TrainingDivergedError, match="at step 0: the gradient norm before clipping"):
        training.train(debug_config(tmp_path, "method=opd"))


def test_nonfinite_teacher_outputs_warn_once(debug_config, tmp_path, monkeypatch):
    """A teacher whose outputs turn NaN after one token (activations overflowing on it)."""
    poison = build_char_tokenizer().convert_tokens_to_ids("=")
    build_module = training.build_module

    def with_poisoned_teacher(cfg, student, teacher, terminator=None):
        def nan_after_poison(module, args, output):
            return output.masked_fill((args[0] == poison)[..., None], NAN)

        teacher.model.get_input_embeddings().register_forward_hook(nan_after_poison)
        return build_module(cfg, student, teacher, terminator)

    monkeypatch.setattr(training, "build_module", with_poisoned_teacher)
    with pytest.warns(UserWarning, match="the teacher's logits are NaN or inf at") as caught:
        summary = training.train(debug_config(tmp_path, "method=opd"))
    assert summary["final_metrics"]["train/teacher_nonfinite"] > 0
    assert sum("teacher's logits are NaN" in str(w.message) for w in caught) == 1
