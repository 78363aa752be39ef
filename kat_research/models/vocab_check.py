"""Pre-flight checks of a student/teacher pair: they must share a vocabulary for token-level KL
to mean anything, and hold finite weights."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class VocabularyMismatchError(ValueError):
    """Teacher and student tokenizers (or logit spaces) disagree."""


class NonFiniteWeightsError(ValueError):
    """A model holds NaN or inf weights."""


def _special_tokens(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Special tokens and their ids (roles such as eos may differ: a base student and an
    instruct teacher of one family share the tokens but not the eos role)."""
    return {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}


def first_vocab_difference(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> str | None:
    """Describe the first disagreement between two tokenizers, or None if they agree.

    Checked: every id the student tokenizer can emit maps to the same token in the teacher,
    and both have the same special tokens with the same ids.
    """
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    t_by_id = {i: t for t, i in t_vocab.items()}
    for token, idx in sorted(s_vocab.items(), key=lambda kv: kv[1]):
        if t_by_id.get(idx) != token:
            return f"id {idx} is {token!r} in the student but {t_by_id.get(idx)!r} in the teacher"
    s_special, t_special = _special_tokens(student), _special_tokens(teacher)
    for token in sorted(s_special.keys() ^ t_special.keys()):
        side = "student" if token in s_special else "teacher"
        return f"special token {token!r} exists only in the {side}"
    return None


def check_vocab_agreement(
    student_name: str,
    student_tok: PreTrainedTokenizerBase,
    student_model: PreTrainedModel,
    teacher_name: str,
    teacher_tok: PreTrainedTokenizerBase,
    teacher_model: PreTrainedModel,
) -> None:
    """Raise ``VocabularyMismatchError`` naming both models and the first difference."""
    diff = first_vocab_difference(student_tok, teacher_tok)
    s_dim = student_model.get_output_embeddings().weight.shape[0]
    t_dim = teacher_model.get_output_embeddings().weight.shape[0]
    if diff is None and s_dim != t_dim:
        diff = f"logit dimension {s_dim} (student) vs {t_dim} (teacher)"
    if diff is not None:
        raise VocabularyMismatchError(
            f"student {student_name!r} and teacher {teacher_name!r} do not share a vocabulary: "
            f"{diff}. On-policy distillation compares next-token distributions id by id, so "
            "pick a teacher and student from the same tokenizer family."
        )


def nonfinite_weights(model: torch.nn.Module) -> dict[str, int]:
    """Parameters and buffers of ``model`` holding NaN or inf, with how many such values each."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    counts = {name: int((~torch.isfinite(t.detach())).sum()) for name, t in tensors}
    return {name: n for name, n in counts.items() if n}


def describe_nonfinite(bad: dict[str, int], shown: int = 3) -> str:
    """``nonfinite_weights``'s answer in words: the count and the first tensors' names."""
    names = ", ".join(f"{name} ({n})" for name, n in list(bad.items())[:shown])
    more = f" and {len(bad) - shown} more tensors" if len(bad) > shown else ""
    return f"{sum(bad.values())} NaN/inf weight values, in {names}{more}"


def check_finite_weights(name: str, model: torch.nn.Module) -> None:
    """Raise ``NonFiniteWeightsError`` naming the model and its NaN/inf tensors, if any."""
    bad = nonfinite_weights(model)
    if bad:
        raise NonFiniteWeightsError(
            f"{name} holds {describe_nonfinite(bad)}: its checkpoint is corrupt or was saved "
            "from a diverged run; load another checkpoint of this model."
        )
