"""Model loading, tiny in-code models for tests and demos, and the vocabulary check."""

from kat_research.models.loading import (
    LoadedModel,
    freeze,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from kat_research.models.tiny import (
    build_bpe_tokenizer,
    build_char_tokenizer,
    build_tiny_qwen3,
    save_tiny_model,
    tiny_random_model,
)
from kat_research.models.vocab_check import (
    VocabularyMismatchError,
    check_vocab_agreement,
    first_vocab_difference,
)

__all__ = [
    "LoadedModel",
    "VocabularyMismatchError",
    "build_bpe_tokenizer",
    "build_char_tokenizer",
    "build_tiny_qwen3",
    "check_vocab_agreement",
    "first_vocab_difference",
    "freeze",
    "load_causal_lm",
    "load_tokenizer",
    "pick_device",
    "save_tiny_model",
    "tiny_random_model",
]
