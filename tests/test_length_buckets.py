"""The training forward in length buckets: bucketing by hand, and hidden states and gradients
equal to one padded forward (the oracle) at every kept position."""

from __future__ import annotations

import torch

from kat_research.lit.length_buckets import bucket_rows, bucketed_hidden, kept_extent
from kat_research.models import build_char_tokenizer, build_tiny_qwen3
from kat_research.rollout import prompt_positions


def test_kept_extent_and_buckets_by_hand():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # 3
            [0, 0, 0, 0, 0],  # none kept
            [1, 1, 1, 1, 1],  # 5
            [1, 0, 1, 0, 0],  # 3 (a masked token inside counts to its extent)
            [1, 0, 0, 0, 0],  # 1
        ],
        dtype=torch.bool,
    )
    extent = kept_extent(mask)
    assert extent.tolist() == [3, 0, 5, 3, 1]
    buckets = bucket_rows(extent, 2)  # sorted: rows 1 (0), 4 (1), 0 (3) | 3 (3), 2 (5)
    assert [(rows.tolist(), w) for rows, w in buckets] == [([1, 4, 0], 3), ([3, 2], 5)]
    assert [(rows.tolist(), w) for rows, w in bucket_rows(extent, 1)] == [([1, 4, 0, 3, 2], 5)]
    # more buckets than rows: one row each; a row that keeps nothing still gets width 1
    assert [w for _, w in bucket_rows(extent, 9)] == [1, 1, 3, 3, 5]


def test_bucketed_forward_equals_one_padded_forward():
    torch.manual_seed(0)
    model = build_tiny_qwen3(build_char_tokenizer(), hidden_size=32, num_layers=2, seed=0)
    batch, prompt_width, width = 6, 5, 12
    input_ids = torch.randint(3, 40, (batch, prompt_width + width))
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask[0, :2] = False  # left-padded prompts
    attention_mask[3, :1] = False
    lengths = torch.tensor([12, 3, 7, 12, 1, 9])  # generated tokens per row
    cols = torch.arange(width)
    attention_mask[:, prompt_width:] = cols < lengths[:, None]
    cuts = torch.tensor([10, 3, 2, 12, 0, 9])  # kept tokens per row (0: nothing kept)
    loss_mask = cols < cuts[:, None]

    def forward(ids, mask, positions):
        return model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state

    full = forward(input_ids, attention_mask, prompt_positions(attention_mask))
    oracle = full[:, prompt_width - 1 : prompt_width - 1 + width]
    for n in (1, 2, 4, 6):
        got = bucketed_hidden(forward, input_ids, attention_mask, prompt_width, loss_mask, n)
        assert got.shape == oracle.shape
        torch.testing.assert_close(got[loss_mask], oracle[loss_mask], rtol=1e-5, atol=1e-5)
    # the gradient of a loss on the kept positions is the one-forward gradient
    weights = torch.randn(oracle.shape[-1])

    def grads(hidden):
        model.zero_grad()
        (hidden[loss_mask] @ weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(
        forward(input_ids, attention_mask, prompt_positions(attention_mask))[
            :, prompt_width - 1 : prompt_width - 1 + width
        ]
    )
    bucketed = grads(
        bucketed_hidden(forward, input_ids, attention_mask, prompt_width, loss_mask, 3)
    )
    for a, b in zip(reference, bucketed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
