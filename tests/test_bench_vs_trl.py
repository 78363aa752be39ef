"""scripts/bench_vs_trl.py's fixture is the one DESIGN.md §6 and results/engine_vs_trl.md
describe (the TRL side itself runs in .venv-trl: `make bench-trl`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_vs_trl as bench  # noqa: E402


def test_fixture_sizes_vocabulary_and_prompts():
    tok = bench.build_bpe_tokenizer(bench.corpus(), vocab_size=512)
    assert len(tok) == 512
    teacher = bench.build_tiny_qwen3(tok, seed=1, **bench.TEACHER)
    student = bench.build_tiny_qwen3(tok, seed=0, **bench.STUDENT)
    assert round(bench.count(teacher) / 1e6, 2) == 3.28
    assert round(bench.count(student) / 1e6, 2) == 0.46
    batch = bench.prompt_batch(tok, 8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 8 and mask[:, -1].all()  # left-padded: every row ends on a token
    texts = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]
    assert all(t.startswith("<|im_start|>user\nCompute ") for t in texts)
    assert all(t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in texts)
