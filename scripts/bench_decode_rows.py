"""What one decode step costs against how many rows are still decoding (issue 14, item 5).

    python scripts/bench_decode_rows.py [--rows 1 2 4 8 16 32] [--context 64 192]
        [--steps 32] [--repeats 5] [--threads 1] [model.student=...]

The engine drops stopped rows from the student's batch, so a batch's sampling time is
sum over its decode steps of cost(rows still live). If a step's cost were proportional to its
rows, sampling time would fall as fast as the generated tokens do; a fixed per-step cost
(the forward's and the sampler's overhead) makes the batch pay for its longest row instead.
This script times the engine's own HF sampler (KV-cache forward, top-p sampling, log-probs)
on n rows of testbed prompts after ``context`` generated tokens, side by side for every n in
one run, and fits cost(n) = a + b n by least squares. It prints ms per decode step, the ratio
to the full batch, and a and b; torch runs ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from hydra.utils import instantiate

from kat_research.config import compose
from kat_research.data.prompts import PromptCollator
from kat_research.data.sources import SourceSpec, load_rows
from kat_research.rollout.backends import HFBackend
from kat_research.rollout.types import SamplingConfig


def time_decode_steps(
    backend: HFBackend,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: SamplingConfig,
    context: int,
    steps: int,
    seed: int,
) -> float:
    """Seconds per decode step of all rows, timed over ``steps`` steps after ``context``
    untimed ones (no stop token, so every row stays live)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = backend.begin(prompt_ids, prompt_mask, sampling, keep_logits=True)
    no_cap = torch.full((prompt_ids.shape[0],), context + steps + 1)
    if context:
        sampler.sample(0, context, no_cap, generator)
    start = time.perf_counter()
    sampler.sample(context, steps, no_cap, generator)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[64, 192])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: scale=tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(args.overrides)
    student = instantiate(cfg.model.student)
    student.model.eval()
    tok = student.tokenizer
    rows, _ = load_rows(SourceSpec(**{**cfg.data.source, "n": max(args.rows), "seed": 5}))
    collate = PromptCollator(tok, cfg.data.max_prompt_tokens, cfg.data.instruction, cfg.data.system)
    prompts = collate(rows)  # as training encodes them
    sampling = SamplingConfig(cfg.rollout.temperature, cfg.rollout.top_p, 10_000, ())
    backend = HFBackend(student.model)
    print(
        f"student {cfg.model.student.get('path') or cfg.model.student._target_}, "
        f"{args.threads} thread(s); ms per decode step, median of {args.repeats} repeats of "
        f"{args.steps} steps, rows in shuffled order each repeat\n"
    )
    print(
        "| generated context | "
        + " | ".join(f"{n} rows" for n in args.rows)
        + " | a (ms) | b (ms/row) |"
    )
    print("|---" * (len(args.rows) + 3) + "|")
    order = np.random.default_rng(0)
    with torch.no_grad():
        for context in args.context:
            times: dict[int, list[float]] = {n: [] for n in args.rows}
            for repeat in range(args.repeats):
                for n in order.permutation(args.rows):  # interleaved: load drifts hit all n
                    ids, mask = prompts["input_ids"][:n], prompts["attention_mask"][:n]
                    times[int(n)].append(
                        time_decode_steps(backend, ids, mask, sampling, context, args.steps, repeat)
                    )
            ms = {n: 1000 * statistics.median(v) for n, v in times.items()}
            b, a = np.polyfit(list(ms), list(ms.values()), 1)
            full = ms[max(args.rows)]
            cells = " | ".join(f"{ms[n]:.2f} ({ms[n] / full:.2f})" for n in args.rows)
            print(f"| {context} | {cells} | {a:.2f} | {b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
