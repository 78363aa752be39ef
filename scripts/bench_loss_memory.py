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

from kat_research.losses import LOSS_KINDS, opd_loss
from kat_research.losses.naive import make_inputs, naive_loss
from kat_research.losses.opd import DEFAULT_CHUNK_SIZE

MIB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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
