"""Chat formatting of problems and the collators that turn rows into model batches."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from kat_research.data.sources import Row

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
IGNORE_INDEX = -100

_warned_no_template = False


def _has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> str:
    """The prompt text: the problem, a newline and the instruction, as an opened assistant turn.

    Tokenizers without a chat template get plain text (``problem\\ninstruction\\n``) and a
    one-time warning.
    """
    content = f"{problem}\n{instruction}" if instruction else problem
    if not _has_template(tokenizer):
        global _warned_no_template
        if not _warned_no_template:
            warnings.warn(
                "tokenizer has no chat template; prompts are plain 'problem\\ninstruction\\n' text",
                stacklevel=2,
            )
            _warned_no_template = True
        return f"{system}\n{content}\n" if system else f"{content}\n"
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each formatted prompt (special tokens come from the template, if any)."""
    if not problems:
        return []
    texts = [format_prompt(tokenizer, problem, instruction, system) for problem in problems]
    return tokenizer(texts, add_special_tokens=not _has_template(tokenizer)).input_ids


def encode_completions(
    tokenizer: PreTrainedTokenizerBase, solutions: Sequence[str]
) -> list[list[int]]:
    """Token ids of SFT targets, each ending with the eos token so the model learns to stop."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; SFT targets need one to end with")
    if not solutions:
        return []
    encoded = tokenizer(list(solutions), add_special_tokens=False).input_ids
    return [[*ids, tokenizer.eos_token_id] for ids in encoded]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] long, attention mask [B, L] long) of sequences padded to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class PromptCollator:
    """Rows -> left-padded prompt batch for rollouts, with answers and ids for grading.

    Rows longer than ``max_prompt_tokens`` are an error here: the data module drops them first.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_prompt_tokens: int,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.instruction = instruction
        self.system = system

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor | list]:
        encoded = encode_prompts(
            self.tokenizer, [r.problem for r in rows], self.instruction, self.system
        )
        for row, ids in zip(rows, encoded, strict=True):
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt of {row.problem_id} has {len(ids)} tokens > "
                    f"max_prompt_tokens={self.max_prompt_tokens}"
                )
        input_ids, attention_mask = pad_sequences(encoded, _pad_id(self.tokenizer), left=True)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "answers": [r.answer for r in rows],
            "problem_ids": [r.problem_id for r in rows],
            "problems": [r.problem for r in rows],
        }


class SFTCollator:
    """Rows with a ``solution`` -> right-padded prompt + solution + eos, loss on the solution only.

    ``labels`` hold -100 on prompt and padding positions. Rows longer than ``max_length`` are
    an error here: the data module drops them first.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.instruction = instruction
        self.system = system

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        missing = [r.problem_id for r in rows if r.solution is None]
        if missing:
            raise ValueError(f"rows without a solution to train on: {missing}")
        prompts = encode_prompts(
            self.tokenizer, [r.problem for r in rows], self.instruction, self.system
        )
        completions = encode_completions(self.tokenizer, [r.solution for r in rows])
        sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
        for row, sequence in zip(rows, sequences, strict=True):
            if len(sequence) > self.max_length:
                raise ValueError(
                    f"{row.problem_id} has {len(sequence)} tokens > max_length={self.max_length}"
                )
        input_ids, attention_mask = pad_sequences(sequences, _pad_id(self.tokenizer), left=False)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        for i, prompt in enumerate(prompts):
            labels[i, : len(prompt)] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def drop_too_long(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = None,
    max_length: int | None = None,
) -> tuple[list[Row], int]:
    """(rows that fit, number dropped).

    A prompt must fit ``max_prompt_tokens``; with ``max_length``, prompt + solution + eos must
    fit ``max_length`` too.
    """
    lengths = [
        len(ids)
        for ids in encode_prompts(tokenizer, [r.problem for r in rows], instruction, system)
    ]
    fits = [n <= max_prompt_tokens for n in lengths]
    if max_length is not None:
        with_solution = [i for i, r in enumerate(rows) if r.solution is not None]
        completions = encode_completions(tokenizer, [rows[i].solution for i in with_solution])
        for i, ids in zip(with_solution, completions, strict=True):
            fits[i] = fits[i] and lengths[i] + len(ids) <= max_length
    kept = [row for row, ok in zip(rows, fits, strict=True) if ok]
    return kept, len(rows) - len(kept)
