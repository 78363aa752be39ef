"""The divergence guard: NaN/inf logits, loss or gradient norm stop training with a message
naming the step, the quantity and the settings to change; finite bounds on the gradient norm and
the weights warn once; a teacher with NaN weights or overflowing outputs is reported as such."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import config

from kat_research import training
from kat_research.models import build_char_tokenizer, save_tiny_model
from kat_research.models.vocab_check import (
    NonFiniteWeightsError,
    check_finite_weights,
    nonfinite_weights,
)
from kat_research.rollout import RolloutEngine, SamplingConfig, check_head_reproduces_logits
from kat_research.rollout.sampling import NonFiniteLogitsError, sample_next_token

NAN, INF = float("nan"), float("inf")


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


def test_training_with_a_nan_teacher_checkpoint_names_the_tensor(tmp_path):
    folder = save_tiny_model(tmp_path / "nan_teacher", build_char_tokenizer(), hidden_size=64)
    weights = load_file(folder / "model.safetensors")
    weights[DOWN_PROJ][3, 5] = NAN
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config(
        tmp_path / "run",
        "model/teacher=qwen3_8b",
        f"model.teacher.name_or_path={folder}",
        "model.teacher.dtype=float32",
    )
    with pytest.raises(NonFiniteWeightsError, match=f"1 NaN/inf weight values, in {DOWN_PROJ}"):
        training.train(cfg)
