"""How often KAT's teacher should score: rollouts of one batch with KAT at a fixed threshold,
teacher scoring every `stride` tokens (KAT's default) against coarser chunks, side by side.

    python scripts/bench_kat_scoring.py --student <model folder> --threshold <t> \
        [--score-every 8 16 32] [--rollouts 64] [--repeats 3]

Coarser chunks mean fewer teacher forwards, but a row the rule stops mid-chunk keeps
generating to the chunk's end (the rule still evaluates every `stride` window inside a chunk, so
the cut of a given rollout does not move). Rollouts are not identical across settings: once a
row stops at a different point, the batch's later random draws differ. So each setting samples
the same prompts with the same --repeats seeds, and the script prints per setting the mean over
repeats of the generate time, the teacher's time, and the tokens generated and kept per rollout;
torch runs one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra.utils import instantiate

from kat_research.config import compose
from kat_research.data.prompts import PromptCollator
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.models import load_causal_lm
from kat_research.rollout import RolloutEngine, SamplingConfig
from kat_research.termination import KATTerminator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a saved student folder")
    parser.add_argument("--threshold", type=float, required=True, help="KAT's fixed threshold")
    parser.add_argument("--score-every", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = compose([])  # scale=tiny: the testbed's teacher, task, cap and KAT windows
    teacher = instantiate(cfg.model.teacher)
    student = load_causal_lm(args.student, trainable=False)
    tok = student.tokenizer
    rows, _ = load_rows(SourceSpec(**{**cfg.data.source, "n": args.rollouts, "seed": 5}))
    collate = PromptCollator(tok, cfg.data.max_prompt_tokens, cfg.data.instruction, cfg.data.system)
    kat = instantiate(cfg.termination.kat).with_fixed_threshold(args.threshold)
    sampling = SamplingConfig(
        cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens, (tok.eos_token_id,)
    )
    print(
        f"KAT W={kat.window} stride={kat.stride} patience={kat.patience} threshold "
        f"{args.threshold}; {args.rollouts} rollouts, cap {cfg.rollout.max_new_tokens}\n"
    )
    print(
        "| score every | generate (s) | teacher (s) | tokens generated / rollout "
        "| tokens kept / rollout |"
    )
    print("|---|---|---|---|---|")
    for every in args.score_every:
        terminator = KATTerminator(kat)
        engine = RolloutEngine(
            student.model,
            teacher.model,
            sampling=sampling,
            pad_token_id=tok.pad_token_id,
            terminator=terminator,
            score_every=every,
        )
        times, teacher_times, generated, kept = [], [], [], []
        for seed in range(args.repeats):
            start, t_teacher, n_gen, n_kept = time.perf_counter(), 0.0, 0, 0
            for lo in range(0, len(rows), args.batch_size):
                batch = collate(rows[lo : lo + args.batch_size])
                out = engine.generate(
                    batch["input_ids"],
                    batch["attention_mask"],
                    torch.Generator().manual_seed(seed),
                )
                n_gen, n_kept = n_gen + int(out.lengths.sum()), n_kept + int(out.cut.sum())
                t_teacher += out.timings["teacher"]
            times.append(time.perf_counter() - start)
            teacher_times.append(t_teacher)
            generated.append(n_gen / len(rows))
            kept.append(n_kept / len(rows))
        print(
            f"| {every} | {statistics.mean(times):.2f} | {statistics.mean(teacher_times):.2f} "
            f"| {statistics.mean(generated):.1f} | {statistics.mean(kept):.1f} |"
        )


if __name__ == "__main__":
    main()
