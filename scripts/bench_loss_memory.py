"""Peak extra CPU memory of the chunked OPD loss versus materialising all logits at once.

Each measurement (one loss kind, chunked or naive) runs forward + backward in a fresh
subprocess. Peak extra memory = peak RSS (``ru_maxrss``) minus the RSS right after the
inputs (hidden states, heads, teacher outputs) are allocated. The naive version builds
[N, vocab] logits for the whole batch, which at N=16,384 would not fit safely here, so it is
measured at ``--naive-n`` positions and extrapolated linearly to N (it is linear in N).

    .venv/bin/python scripts/bench_loss_memory.py              # ~few minutes on 2 cores
    .venv/bin/python scripts/bench_loss_memory.py --n 4096 --chunk-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from kat_research.losses import (
    DEFAULT_K,
    LOSS_KINDS,
    TeacherTargets,
    opd_loss,
    per_token_reverse_kl,
)
from kat_research.losses.opd import DEFAULT_CHUNK_SIZE

MIB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_inputs(
    kind: str, n: int, vocab: int, hidden: int, chunk_size: int, device: str | torch.device = "cpu"
):
    """Student hidden states and head, targets, weights and the teacher output ``kind`` uses,
    built on ``device``."""
    torch.manual_seed(0)
    student_head = nn.Linear(hidden, vocab, bias=False, device=device)
    teacher_head = nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    student_hidden = torch.randn(n, hidden, device=device, requires_grad=True)
    teacher_hidden = torch.randn(n, hidden, device=device)
    targets = torch.randint(vocab, (n,), device=device)
    weights = torch.full((n,), 1.0 / n, device=device)
    if kind in ("full", "topk_tail"):
        teacher = TeacherTargets(hidden=teacher_hidden, lm_head=teacher_head)
    else:  # what a rollout engine would keep: top-K or sampled-token log-probs
        topk_values, topk_ids, sampled = [], [], []
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                log_q = F.log_softmax(teacher_head(teacher_hidden[rows]), dim=-1)
                top = log_q.topk(DEFAULT_K["topk_lsm"], dim=-1)
                topk_values.append(top.values)
                topk_ids.append(top.indices)
                sampled.append(log_q.gather(-1, targets[rows, None]).squeeze(-1))
        if kind == "topk_lsm":
            teacher = TeacherTargets(
                topk_logprobs=torch.cat(topk_values), topk_ids=torch.cat(topk_ids)
            )
        else:
            teacher = TeacherTargets(sampled_logprobs=torch.cat(sampled))
    return student_hidden, student_head, targets, weights, teacher


def naive_loss(student_hidden, student_head, targets, weights, teacher, kind):
    """The same loss with every position's logits materialised at once."""
    logits = student_head(student_hidden)
    if kind == "sampled_token":
        log_p = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        return (weights * (log_p - teacher.sampled_logprobs).detach() * log_p).sum()
    if kind == "topk_lsm":
        teacher_logits = torch.full_like(logits, float("-inf")).detach()
        teacher_logits.scatter_(-1, teacher.topk_ids, teacher.topk_logprobs)
    else:
        with torch.no_grad():
            teacher_logits = teacher.lm_head(teacher.hidden)
    return (weights * per_token_reverse_kl(logits, teacher_logits, kind=kind)).sum()


def measure(kind: str, mode: str, n: int, vocab: int, hidden: int, chunk_size: int) -> dict:
    """Forward + backward once; peak extra memory over the post-input baseline."""
    inputs = make_inputs(kind, n, vocab, hidden, chunk_size)
    baseline = rss_bytes()
    start = time.perf_counter()
    if mode == "chunked":
        loss = opd_loss(*inputs, kind=kind, chunk_size=chunk_size).loss
    else:
        loss = naive_loss(*inputs, kind=kind)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_extra_mib": (peak_rss_bytes() - baseline) / MIB, "seconds": seconds}


def run_worker(kind: str, mode: str, n: int, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process; blocks >= 1 MiB are mmapped, so freeing them lowers RSS."""
    cmd = [
        sys.executable, __file__, "--worker", kind, mode, str(n),
        "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--chunk-size", str(args.chunk_size),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16_384, help="positions in the batch")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--naive-n", type=int, default=1024, help="positions for the naive run")
    parser.add_argument("--kinds", nargs="+", default=list(LOSS_KINDS), choices=LOSS_KINDS)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, mode, n = args.worker
        result = measure(kind, mode, int(n), args.vocab, args.hidden, args.chunk_size)
        print(json.dumps(result))
        return

    block_mib = args.chunk_size * args.vocab * 4 / MIB
    print(
        f"N={args.n} vocab={args.vocab} hidden={args.hidden} chunk_size={args.chunk_size} "
        f"(one [chunk, vocab] float32 block = {block_mib:.0f} MiB); naive measured at "
        f"N={args.naive_n} and extrapolated linearly to N={args.n}"
    )
    header = f"{'kind':<14} {'chunked MiB':>12} {'chunked s':>10} {'naive MiB (extrap.)':>20} "
    print(header + f"{'ratio':>7}")
    scale = args.n / args.naive_n
    for kind in args.kinds:
        chunked = run_worker(kind, "chunked", args.n, args)
        naive = run_worker(kind, "naive", args.naive_n, args)
        naive_mib = naive["peak_extra_mib"] * scale
        print(
            f"{kind:<14} {chunked['peak_extra_mib']:>12.0f} {chunked['seconds']:>10.1f} "
            f"{naive_mib:>20.0f} {naive_mib / chunked['peak_extra_mib']:>7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
