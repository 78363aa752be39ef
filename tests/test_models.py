"""Tiny-model factory, loader and the teacher/student vocabulary check."""

from __future__ import annotations

import pytest
import torch

from kat_research.models import (
    VocabularyMismatchError,
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tiny_qwen3,
    check_vocab_agreement,
    first_vocab_difference,
    load_causal_lm,
    save_tiny_model,
)
from kat_research.models.cache import publish_folder


def test_tiny_model_round_trips_through_the_loader(tmp_path, char_tokenizer):
    built = build_tiny_qwen3(char_tokenizer, hidden_size=32, seed=3)
    path = save_tiny_model(tmp_path / "m", char_tokenizer, hidden_size=32, seed=3)
    loaded = load_causal_lm(str(path), dtype="float32", trainable=True)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.model(ids).logits, built(ids).logits)
    assert loaded.tokenizer.get_vocab() == char_tokenizer.get_vocab()
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.model.config.vocab_size == len(char_tokenizer)
    assert all(p.requires_grad for p in loaded.model.parameters())


def test_teacher_is_frozen_in_eval_mode(tiny_dirs):
    teacher = load_causal_lm(tiny_dirs["teacher"], trainable=False, dtype="bf16")
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert next(teacher.model.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_keeps_gradients_and_rollouts(tiny_dirs):
    plain = load_causal_lm(tiny_dirs["student"]).model
    ckpt = load_causal_lm(tiny_dirs["student"], gradient_checkpointing=True).model
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    # cached decoding (eval mode, as in rollouts) still works and matches
    with torch.no_grad():
        out = [m.eval().generate(ids, max_new_tokens=4, do_sample=False) for m in (plain, ckpt)]
    assert torch.equal(out[0], out[1])


def test_unknown_dtype_is_rejected(tiny_dirs):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(tiny_dirs["teacher"], dtype="float8")


def test_char_tokenizer_round_trip_and_chat_template(char_tokenizer):
    text = "28*5=140, 140-11=129 \\boxed{129}\n"
    ids = char_tokenizer(text).input_ids
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text
    prompt = char_tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    assert char_tokenizer.eos_token == "<|im_end|>"


def test_bpe_tokenizer_trained_in_code():
    corpus = ["12+34=46", "\\boxed{46}", "the answer is 46"] * 50
    tok = build_bpe_tokenizer(corpus, vocab_size=300)
    text = "the answer is \\boxed{46}"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(text).input_ids) < len(text)  # merges were learned


def test_vocab_agreement(tiny_pair):
    student, teacher = tiny_pair
    check_vocab_agreement(
        "s", student.tokenizer, student.model, "t", teacher.tokenizer, teacher.model
    )


def test_vocab_mismatch_names_both_models_and_first_difference(char_tokenizer):
    other = build_char_tokenizer("0123456789+-*=")
    assert first_vocab_difference(char_tokenizer, other) is not None
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocab_agreement(
            "student-x",
            char_tokenizer,
            build_tiny_qwen3(char_tokenizer, hidden_size=16),
            "teacher-y",
            other,
            build_tiny_qwen3(other, hidden_size=16),
        )
    message = str(err.value)
    assert "student-x" in message and "teacher-y" in message and "id 14 is 'a'" in message


def test_logit_dimension_mismatch_is_reported(char_tokenizer):
    student = build_tiny_qwen3(char_tokenizer, hidden_size=16)
    teacher = build_tiny_qwen3(char_tokenizer, hidden_size=16)
    teacher.resize_token_embeddings(len(char_tokenizer) + 8)
    with pytest.raises(VocabularyMismatchError, match="logit dimension"):
        check_vocab_agreement("s", char_tokenizer, student, "t", char_tokenizer, teacher)


def test_special_token_difference_is_reported(char_tokenizer):
    other = build_char_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<tool>"]})
    assert first_vocab_difference(char_tokenizer, other) == (
        "special token '<tool>' exists only in the teacher"
    )


def test_publish_folder_is_atomic_and_first_writer_wins(tmp_path):
    target = tmp_path / "cache" / "model"
    with publish_folder(target) as first:
        (first / "weights").write_text("first")
        with publish_folder(target) as second:  # a concurrent job finishing earlier
            (second / "weights").write_text("second")
        assert (target / "weights").read_text() == "second"
    assert (target / "weights").read_text() == "second"  # the later copy is discarded
    with pytest.raises(RuntimeError), publish_folder(tmp_path / "cache" / "broken") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("training failed")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]  # no leftovers
