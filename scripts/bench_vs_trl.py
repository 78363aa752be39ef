"""The project's OPD training step against TRL's ``GKDTrainer`` step on one fixture (issue 21).

Both distil a tiny random-init Qwen3 teacher (hidden 256, 4 layers, 3.3M parameters) into a
tiny Qwen3 student (hidden 128, 2 layers, 0.46M) over one in-code BPE vocabulary of 512 tokens:
the same batch of prompts, on-policy rollouts of up to --new-tokens tokens at temperature 1
(stop at the end-of-turn token), the full-vocabulary reverse KL averaged over generated tokens,
AdamW (same learning rate), gradient-norm clip 1.0, one torch thread.

* The project: ``OPDModule`` (``loss.kind=full``, no terminator) fitted by a Lightning
  ``Trainer``; a step is timed from ``on_train_batch_start`` to ``on_train_batch_end``, the
  module's own ``perf/step_time_s`` (rollout, loss, backward, clip, AdamW, weight sync, logging).
* TRL 1.16: ``GKDTrainer`` with ``lmbda=1`` (every step on-policy) and ``beta=1`` (reverse KL);
  a step is what the Trainer's inner loop runs: ``training_step`` (``model.generate``, student
  and teacher forwards, loss, backward), gradient clipping, ``optimizer.step``, scheduler step,
  ``zero_grad``; the loop's own bookkeeping (callbacks, logging) is not counted.

After --warmup pairs, each of --pairs pairs runs one step of each back to back (which goes first
alternates), so both see the same machine load. Prints every pair, the median ratio
project/TRL with its range, and the share of the project's step spent in the rollout.

    make bench-trl ARGS="--pairs 7"
    .venv-trl/bin/python scripts/bench_vs_trl.py [--pairs 5] [--batch 8] [--new-tokens 64]
        [--profile]

--profile runs everything under cProfile (which inflates Python-heavy code, so its step times
are not the benchmark's) and prints where each side's step goes, per call.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import logging
import pstats
import random
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from kat_research.lit import OPDModule
from kat_research.models import build_bpe_tokenizer, build_tiny_qwen3
from kat_research.provenance import code_commit

TEACHER = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
STUDENT = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)

# --profile: (file path suffix, function) -> what it is, in the order printed
PROFILED = {
    ("rollout/engine.py", "generate"): "project: rollout (RolloutEngine.generate)",
    ("backends/hf.py", "sample"): "  student decode (HFSampler.sample)",
    ("backends/hf.py", "_next_logits"): "    one student decode step",
    ("rollout/sampling.py", "sample_next_token"): "    one sample_next_token",
    ("rollout/cached_lm.py", "prefill"): "  teacher prefill",
    ("rollout/engine.py", "_score_chunk"): "  teacher chunk forward + KL",
    ("lit/opd_module.py", "distillation_loss"): "project: loss forward",
    ("lit/opd_module.py", "_log_rollout"): "project: metrics (Lightning log_dict)",
    ("gkd/gkd_trainer.py", "generate_on_policy_outputs"): "TRL: generate",
    ("gkd/gkd_trainer.py", "compute_loss"): "TRL: compute_loss (student + teacher)",
}


def print_profile(profiler: cProfile.Profile) -> None:
    """Cumulative seconds per call of the functions in PROFILED."""
    found = {}
    for (path, _, name), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        for (suffix, function), label in PROFILED.items():
            if name == function and path.endswith(suffix):
                found[label] = (cumulative / calls, calls)
    print("cProfile, cumulative seconds per call (profiling inflates Python overhead):")
    for label in PROFILED.values():
        if label in found:
            per_call, calls = found[label]
            print(f"  {label:45s} {per_call:8.4f} s  ({calls} calls)")


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Worked arithmetic in words, enough distinct text for a 512-token BPE vocabulary."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 500)
        texts.append(
            f"Compute {a}*{b}-{c}. Show the steps. First {a} times {b} is {a * b}; "
            f"then {a * b} minus {c} leaves {a * b - c}. The answer is {a * b - c}."
        )
    return texts


def prompt_batch(tokenizer, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Chat-formatted questions, left-padded, as both trainers receive them."""
    rng = random.Random(seed + 1)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Compute {rng.randint(2, 99)}*{rng.randint(2, 99)}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for _ in range(batch)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


class TRLStep:
    """One step of TRL's GKDTrainer as its Trainer's inner loop runs it."""

    def __init__(self, student, teacher, tokenizer, args, folder: str):
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            output_dir=folder,
            per_device_train_batch_size=args.batch,
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            lmbda=1.0,  # always on-policy: the student samples every step's sequences
            beta=1.0,  # generalized JSD at beta=1 is the reverse KL(student || teacher)
            learning_rate=args.lr,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_steps=args.warmup + args.pairs,
            report_to="none",
            use_cpu=True,
            # TRL's defaults autocast to bfloat16 and checkpoint activations, which also turns
            # the KV cache off in generation; the project's step does neither
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            seed=args.seed,
        )
        rows = [{"messages": [{"role": "user", "content": "1"}]}] * args.batch  # never read
        self.trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        # what Trainer.train() does before its loop: optimizer, scheduler, accelerate wrapping
        self.model, _ = self.trainer._prepare_for_training(config.max_steps, None, None)
        self.trainer.current_gradient_accumulation_steps = 1
        self.generate_s: list[float] = []
        self.generated: list[int] = []  # tokens sampled per step
        generate = self.trainer.generate_on_policy_outputs

        @functools.wraps(generate)
        def timed_generate(*a, **kw):
            start = time.perf_counter()
            out = generate(*a, **kw)
            self.generate_s.append(time.perf_counter() - start)
            self.generated.append(int((out[2] != -100).sum()))  # labels: the completions
            return out

        self.trainer.generate_on_policy_outputs = timed_generate

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        t, model = self.trainer, self.model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # the on-policy branch replaces input_ids / attention_mask / labels by the rollouts
        inputs = {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids}
        inputs |= {"attention_mask": mask, "labels": torch.full_like(ids, -100)}
        t.training_step(model, inputs)
        t._clip_grad_norm(model)
        t.optimizer.step()
        t.lr_scheduler.step()
        model.zero_grad()


class Interleave(L.Callback):
    """Times each project step and runs one TRL step beside it (before it on odd steps)."""

    def __init__(self, trl_step: TRLStep, batch: dict[str, torch.Tensor]):
        self.trl_step, self.batch = trl_step, batch
        self.project_s: list[float] = []
        self.rollout_s: list[float] = []
        self.trl_s: list[float] = []
        self.generated: list[int] = []  # tokens sampled per step

    def _trl(self) -> None:
        start = time.perf_counter()
        self.trl_step(self.batch)
        self.trl_s.append(time.perf_counter() - start)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx % 2:
            self._trl()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.project_s.append(time.perf_counter() - self.start)
        self.rollout_s.append(module.last_rollout.timings["total"])
        self.generated.append(int(module.last_rollout.lengths.sum()))
        if batch_idx % 2 == 0:
            self._trl()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs of steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Lightning's dataloader-worker and TRL's migration hints

    tok = build_bpe_tokenizer(corpus(), vocab_size=512)
    teacher = build_tiny_qwen3(tok, seed=1, **TEACHER).eval()
    student = build_tiny_qwen3(tok, seed=0, **STUDENT)
    n_params = {"t": count(teacher), "s": count(student)}
    batch = prompt_batch(tok, args.batch, args.seed)
    print(
        f"fixture: teacher {n_params['t'] / 1e6:.2f}M, student {n_params['s'] / 1e6:.2f}M "
        f"parameters, vocabulary {len(tok)}, batch {args.batch} x prompt "
        f"{batch['input_ids'].shape[1]} tokens, {args.new_tokens} new tokens, "
        f"{args.threads} torch thread(s), code {code_commit()}"
    )

    with tempfile.TemporaryDirectory() as folder:
        trl_step = TRLStep(copy.deepcopy(student), teacher, tok, args, folder)
        module = OPDModule(
            student,
            teacher,
            tok,
            optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0),
            loss={"kind": "full"},
            rollout={"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0},
            seed=args.seed,
        )
        timer = Interleave(trl_step, batch)
        steps = args.warmup + args.pairs
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            gradient_clip_val=1.0,
            gradient_clip_algorithm="norm",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
            default_root_dir=folder,
        )
        loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        trainer.fit(module, train_dataloaders=loader)
        if profiler is not None:
            profiler.disable()

    w = args.warmup
    project, trl, rollout = timer.project_s[w:], timer.trl_s[w:], timer.rollout_s[w:]
    ratios = [p / t for p, t in zip(project, trl, strict=True)]
    print(f"{'pair':>4} {'project s':>10} {'TRL s':>8} {'ratio':>6} {'rollout share':>14}")
    for i, (p, t, r) in enumerate(zip(project, trl, rollout, strict=True)):
        print(f"{i:4d} {p:10.4f} {t:8.4f} {p / t:6.3f} {r / p:14.2f}")
    trl_gen = trl_step.generate_s[w:]
    print(
        f"median step: project {statistics.median(project):.4f} s, TRL "
        f"{statistics.median(trl):.4f} s; rollout {statistics.median(rollout):.4f} s "
        f"({statistics.median(r / p for r, p in zip(rollout, project, strict=True)):.0%} of the "
        f"project's step), TRL's generate {statistics.median(trl_gen):.4f} s"
    )
    print(
        f"tokens sampled per step (median): project {statistics.median(timer.generated[w:]):.0f}, "
        f"TRL {statistics.median(trl_step.generated[w:]):.0f}"
    )
    print(
        f"ratio project/TRL over {len(ratios)} pairs: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    if profiler is not None:
        print_profile(profiler)


if __name__ == "__main__":
    main()
