"""Shared fixtures: composed configs (the `debug=fast` preset sizes training runs for tests) and
tiny Qwen3 student/teacher pairs saved to disk and loaded like hub models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from kat_research import config  # noqa: E402
from kat_research.models import build_char_tokenizer, load_causal_lm, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def compose_config():
    """``compose_config(*overrides, config_name="train")``: a config of conf/ (no run folder)."""

    def compose(*overrides: str, config_name: str = "train"):
        return config.compose(overrides, config_name=config_name)

    return compose


@pytest.fixture(scope="session")
def debug_config(tmp_path_factory):
    """``debug_config(run_dir, *overrides)``: a training config of the `debug=fast` preset (tiny
    random models, 2 steps, a checkpoint per step) writing into ``run_dir``; the tiny models are
    cached once per session."""
    cache = tmp_path_factory.mktemp("model_cache")

    def compose(run_dir, *overrides: str):
        return config.compose(
            ["debug=fast", f"paths.output_dir={run_dir}", f"paths.cache_dir={cache}", *overrides]
        )

    return compose


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, char_tokenizer):
    """Paths of a tiny student (hidden 32) and teacher (hidden 64) sharing one tokenizer.
    The student has one attention head of size 32, the smallest vLLM's CPU kernels take."""
    root = tmp_path_factory.mktemp("tiny_models")
    student = save_tiny_model(
        root / "student", char_tokenizer, hidden_size=32, num_heads=1, num_kv_heads=1, seed=0
    )
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


# Small CPU engines: float32 like the HF models, no compilation, a 64 MiB KV cache.
VLLM_TEST_SETTINGS = dict(
    dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=2**26
)


@pytest.fixture(scope="session")
def vllm_student(tiny_pair):
    """A vLLM engine serving the tiny student (tests marked ``vllm``, run by `make test-vllm`)."""
    from kat_research.rollout.backends.vllm import VLLMBackend, VLLMSettings

    return VLLMBackend(tiny_pair[0].model, VLLMSettings(**VLLM_TEST_SETTINGS))


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request):
    """The student backend of backend-agnostic engine tests: None (HF decoding) or vLLM."""
    return None if request.param == "hf" else request.getfixturevalue("vllm_student")
