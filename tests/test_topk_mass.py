"""The teacher's mass outside its top-K (issue 23, item 5) on hand-computed distributions."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kat_research.analysis.topk_mass import support_size, support_table, tail_mass, tail_table

# probabilities 1/2, 1/4, 1/8, 1/8 (shuffled) and a uniform row over 4 tokens
LOGITS = torch.tensor(
    [
        [math.log(0.125), math.log(0.5), math.log(0.125), math.log(0.25)],
        [0.0, 0.0, 0.0, 0.0],
    ]
)


def test_tail_mass_on_hand_computed_distributions() -> None:
    tails = tail_mass(LOGITS, [1, 2, 3, 4, 10])
    expected = torch.tensor([[0.5, 0.25, 0.125, 0.0, 0.0], [0.75, 0.5, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(tails, expected.double(), atol=1e-6, rtol=0)  # float32 logits
    with pytest.raises(ValueError, match="K must be"):
        tail_mass(LOGITS, [0])


def test_support_size_on_hand_computed_distributions() -> None:
    assert support_size(LOGITS, 0.5).tolist() == [1, 2]
    assert support_size(LOGITS, 0.75).tolist() == [2, 3]
    assert support_size(LOGITS, 0.9).tolist() == [4, 4]  # 1/2 + 1/4 + 1/8 = 0.875 < 0.9
    assert support_size(LOGITS, 1.0).tolist() == [4, 4]
    with pytest.raises(ValueError, match="coverage"):
        support_size(LOGITS, 0.0)


def test_tables_summarise_per_k_and_coverage() -> None:
    table = tail_table(tail_mass(LOGITS, [1, 4]), [1, 4])
    assert table.loc[1, "mean"] == pytest.approx(0.625)
    assert table.loc[1, "max"] == pytest.approx(0.75)
    assert table.loc[1, "share > 1e-2"] == 1.0 and table.loc[4, "share > 1e-3"] == 0.0
    support = support_table({0.75: support_size(LOGITS, 0.75)})
    assert support.loc[0.75].tolist() == [2.5, 2.0, 3]


def test_the_script_runs_end_to_end_on_tiny_models(tmp_path) -> None:
    """scripts/topk_tail_mass.py samples, scores and writes its report (it once passed the
    module where the prompt encoder wants a tokenizer, and nothing ran it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "topk_tail_mass.py"
    spec = importlib.util.spec_from_file_location("topk_tail_mass", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "mass.md"
    argv = ["--rollouts", "4", "--batch", "2", "--ks", "1", "4", "--out", str(out), "debug=fast"]
    text = script.main(argv)
    assert out.read_text() == text + "\n"
    assert text.startswith("# The teacher's probability mass outside its top-K")
    assert (
        "4 rollouts of" in text
        and "command: `python scripts/topk_tail_mass.py --rollouts 4" in text
    )
    rows = [
        line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\|\s+[\d.]+\s+\|", line)
    ]
    assert [float(r[0]) for r in rows] == [1, 4, 0.9, 0.99, 0.999]  # the Ks, then the coverages
    assert 1 > float(rows[0][1]) > float(rows[1][1]) > 0  # mean mass outside the top-1, top-4
