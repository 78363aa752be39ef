"""Shared fixtures: tiny Qwen3 student/teacher pairs saved to disk and loaded like hub models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from kat_research.models import build_char_tokenizer, load_causal_lm, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, char_tokenizer):
    """Paths of a tiny student (hidden 32) and teacher (hidden 64) sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    student = save_tiny_model(root / "student", char_tokenizer, hidden_size=32, seed=0)
    teacher = save_tiny_model(root / "teacher", char_tokenizer, hidden_size=64, seed=1)
    return {"student": str(student), "teacher": str(teacher)}


@pytest.fixture(scope="session")
def tiny_pair(tiny_dirs):
    """(student LoadedModel, teacher LoadedModel), loaded through the real loader."""
    torch.manual_seed(0)
    student = load_causal_lm(tiny_dirs["student"], trainable=True)
    teacher = load_causal_lm(tiny_dirs["teacher"], trainable=False)
    return student, teacher


@pytest.fixture
def prompts(char_tokenizer):
    """Four left-padded prompts of different lengths."""
    texts = ["1+2=", "a longer prompt, 12*3", "xyz", "q"]
    return char_tokenizer(texts, return_tensors="pt", padding=True)
