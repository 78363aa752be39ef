"""Pinned rollouts of the HF rollout engine: what a seeded short rollout samples and scores,
recorded before the decode loop was optimised (issue 21), so that speed work provably computes
the same tokens, log-probs and KL. ``tests/test_engine_golden.py`` compares against the file.

    PYTHONPATH=$PWD python tests/engine_golden.py   # rewrite tests/fixtures/engine_golden.json

Rewrite it only for a change that is meant to alter what the engine samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.termination.base import Terminator

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "engine_golden.json"
PROMPTS = ["1+2=", "a longer prompt, 12*3", "xyz", "q", "Compute 7*8-3.", "zz top"]
FIELDS = ("tokens", "lengths", "cut", "student_logprobs", "kl", "teacher_logprobs")


class Caps(Terminator):
    """A fixed length cap per row, so rows leave the batch mid-chunk."""

    def __init__(self, caps: list[int]):
        self.caps = torch.tensor(caps)

    def begin_batch(self, batch_size, max_new_tokens, generator=None):
        return self.caps.clamp(max=max_new_tokens)

    def __repr__(self) -> str:
        return f"Caps({self.caps.tolist()})"


# name -> (temperature, top_p, max new tokens, stop on these characters, score_every, caps)
CASES: dict[str, tuple[float, float, int, str, int, list[int] | None]] = {
    "t1_full": (1.0, 1.0, 16, "", 5, None),
    "t07_topp09_stops": (0.7, 0.9, 16, "gR", 4, None),
    "caps_lockstep": (1.0, 1.0, 12, "", 1, [3, 12, 7, 1, 12, 5]),
    "caps_topp_stops": (1.3, 0.8, 20, "R", 6, [20, 2, 9, 20, 14, 6]),
}


def golden_rollouts() -> dict[str, dict[str, Any]]:
    """Run every case on tiny random-init models built in code; plain lists per field."""
    tok = build_char_tokenizer()
    student = build_tiny_qwen3(tok, hidden_size=32, num_heads=2, num_kv_heads=1, seed=0).eval()
    teacher = build_tiny_qwen3(tok, hidden_size=64, seed=1).eval()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = {}
    for name, (temp, top_p, n, stops, every, caps) in CASES.items():
        stop_ids = tuple(tok.convert_tokens_to_ids(list(stops))) + (tok.eos_token_id,)
        engine = RolloutEngine(
            student,
            teacher,
            sampling=SamplingConfig(temp, top_p, n, stop_ids),
            pad_token_id=tok.pad_token_id,
            score_every=every,
            terminator=Caps(caps) if caps else None,
        )
        r = engine.generate(enc.input_ids, enc.attention_mask, torch.Generator().manual_seed(11))
        out[name] = {f: getattr(r, f).tolist() for f in FIELDS}
        out[name]["stop_reason"] = list(r.stop_reason)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    GOLDEN.write_text(json.dumps(golden_rollouts(), indent=0) + "\n")
    print(f"wrote {GOLDEN}")
