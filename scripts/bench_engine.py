"""Rollout-engine benchmarks: every number is a ratio measured side by side in one run.

1. Engine without teacher vs ``model.generate`` (same model, batch, sampling): tokens/s ratio.
2. Engine with the teacher scoring online (score_every 16, 64 and 1 = strict lockstep) vs
   generation alone plus one separate teacher forward over the finished sequences.
3. Early stopping: a rule stopping 60% of rows at 25% of the length cap vs no rule.

Each measurement is repeated ``--repeats`` times, interleaved, and the median is reported.

    python scripts/bench_engine.py [--batch 32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.rollout import RolloutEngine, SamplingConfig, prompt_positions
from kat_research.rollout.workloads import StopShareEarly, arithmetic_prompts
from kat_research.runtime import interleaved


def separate_teacher_pass(teacher, student_rollout) -> torch.Tensor:
    """Score finished sequences with one teacher forward: the KL needs student logits too."""
    ids, mask = student_rollout.input_ids, student_rollout.attention_mask
    pos = prompt_positions(mask)
    width = student_rollout.prompt_ids.shape[1]
    with torch.no_grad():
        q = teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        q = q[:, width - 1 : -1].float().log_softmax(-1)
    return q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--early-batch", type=int, default=256, help="batch size for [3]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = build_char_tokenizer()
    student = build_tiny_qwen3(tok, hidden_size=96, num_layers=3, num_heads=4, seed=0).eval()
    teacher = build_tiny_qwen3(tok, hidden_size=128, num_layers=4, num_heads=4, seed=1).eval()
    ids, mask = arithmetic_prompts(tok, args.batch)
    n = args.new_tokens
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=n)
    pad = tok.pad_token_id

    # 1. engine vs model.generate (no stop token: both produce exactly n tokens per row)
    plain = RolloutEngine(student, sampling=sampling, pad_token_id=pad)

    def hf_generate():
        with torch.no_grad():
            student.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=0,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )

    t = interleaved(
        {"engine": lambda: plain.generate(ids, mask), "generate": hf_generate}, args.repeats
    )
    tokens = args.batch * n
    print(f"[1] engine (no teacher) vs model.generate, batch {args.batch}, {n} new tokens")
    print(f"    engine   {tokens / t['engine']:8.0f} tok/s")
    print(f"    generate {tokens / t['generate']:8.0f} tok/s")
    print(
        f"    ratio engine/generate tokens/s = {t['generate'] / t['engine']:.2f}  (target >= 0.9)"
    )

    # 2. online teacher scoring vs generate-then-score
    def online(every: int) -> Callable[[], object]:
        eng = RolloutEngine(
            student, teacher, sampling=sampling, pad_token_id=pad, score_every=every
        )
        return lambda: eng.generate(ids, mask)

    def offline():
        rollout = plain.generate(ids, mask)
        separate_teacher_pass(teacher, rollout)

    t = interleaved(
        {"offline": offline, "online16": online(16), "online64": online(64), "lockstep": online(1)},
        args.repeats,
    )
    print("[2] teacher online (chunked) vs generation + separate teacher pass")
    for name in ("online16", "online64", "lockstep"):
        print(f"    {name:9s} {t[name]:6.2f} s   ratio to offline = {t[name] / t['offline']:.2f}")
    print(f"    offline   {t['offline']:6.2f} s   (target: chunked ratio <= 1.0)")

    # 3. early stopping pays once per-row compute dominates a decode step. At small batch a CPU
    # decode step is bound by reading the weights, whatever the rows; a large batch (as in
    # training: prompts x group size) makes it compute-bound, so dropped rows save time.
    big = build_tiny_qwen3(tok, hidden_size=384, num_layers=4, num_heads=6, seed=2).eval()
    ids, mask = arithmetic_prompts(tok, args.early_batch)
    long = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=2 * n)
    base = RolloutEngine(big, sampling=long, pad_token_id=pad)
    early = RolloutEngine(
        big, sampling=long, pad_token_id=pad, terminator=StopShareEarly(share=0.6, fraction=0.25)
    )
    t = interleaved(
        {"full": lambda: base.generate(ids, mask), "early": lambda: early.generate(ids, mask)},
        args.repeats,
    )
    ideal = 0.4 + 0.6 * 0.25
    print(f"[3] 60% of {args.early_batch} rows stop at 25% of {2 * n} tokens (hidden 384)")
    print(
        f"    no rule {t['full']:6.2f} s, with rule {t['early']:6.2f} s, "
        f"ratio = {t['early'] / t['full']:.2f}  (target <= 0.60; token share {ideal:.2f})"
    )


if __name__ == "__main__":
    main()
