"""The HF engine samples and scores exactly what it did before its decode loop was optimised:
seeded short rollouts (temperatures, top-p, stop tokens, rows capped mid-chunk, chunk sizes
1 to 6) against ``tests/fixtures/engine_golden.json`` (written by ``tests/engine_golden.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_golden import CASES, FIELDS, GOLDEN, golden_rollouts


@pytest.fixture(scope="module")
def rollouts():
    return golden_rollouts()


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_matches_pinned(rollouts, case):
    pinned, got = json.loads(GOLDEN.read_text())[case], rollouts[case]
    assert got["stop_reason"] == pinned["stop_reason"]
    for field in FIELDS:
        a, b = torch.tensor(got[field]), torch.tensor(pinned[field])
        if a.is_floating_point():  # NaN where nothing was generated, on both sides
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=field)
        else:
            assert torch.equal(a, b), field
