"""Tiny random-init Qwen3-architecture models and in-code tokenizers, for tests and offline demos.

They are saved with ``save_pretrained`` and reloaded through the same loader as a hub model,
so tests exercise the real loading path.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from kat_research.models.cache import publish_folder
from kat_research.models.loading import LoadedModel, load_causal_lm

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)

# Qwen-style ChatML template; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Role-free template for the tiniest models: 3 template tokens per turn instead of ~10, which
# matters when the whole sequence is ~40 characters.
COMPACT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
)

DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def _wrap(tok: Tokenizer, chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START],
        padding_side="left",
    )
    wrapped.chat_template = chat_template
    return wrapped


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, chat_template: str = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``alphabet`` plus ChatML tokens
    (``chat_template``: ChatML by default, or ``COMPACT_CHAT_TEMPLATE``)."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap(tok, chat_template)


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` in code, with ChatML tokens."""
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok)


def tiny_qwen3_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
) -> Qwen3Config:
    """The config of a tiny Qwen3 whose vocabulary is exactly ``tokenizer``'s."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def demo_model_config(architecture: Mapping[str, Any]) -> Qwen3Config:
    """The config of a demo model (``kat_research.building``): a tiny Qwen3 of ``architecture``
    (``tiny_qwen3_config``'s keywords) over the character tokenizer with the compact template."""
    tokenizer = build_char_tokenizer(chat_template=COMPACT_CHAT_TEMPLATE)
    return tiny_qwen3_config(tokenizer, **architecture)


def build_tiny_qwen3(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **architecture
) -> Qwen3ForCausalLM:
    """A random-init Qwen3 causal LM of ``tiny_qwen3_config(tokenizer, **architecture)``."""
    config = tiny_qwen3_config(tokenizer, **architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str | Path, tokenizer: PreTrainedTokenizerFast, **model_kwargs) -> Path:
    """Build a tiny Qwen3 for ``tokenizer`` and save model + tokenizer to ``path``."""
    path = Path(path)
    build_tiny_qwen3(tokenizer, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_random_model(
    cache_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    trainable: bool = True,
) -> LoadedModel:
    """A random-init tiny Qwen3 with the character tokenizer, saved once under ``cache_dir``
    and loaded through :func:`load_causal_lm` like any hub model (fast config smoke runs)."""
    arch = dict(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seed=seed,
    )
    path = Path(cache_dir) / "tiny_random" / "_".join(f"{k}{v}" for k, v in arch.items())
    if not (path / "config.json").exists():
        with publish_folder(path) as tmp:
            save_tiny_model(tmp, build_char_tokenizer(), **arch)
    return load_causal_lm(str(path), trainable=trainable)
