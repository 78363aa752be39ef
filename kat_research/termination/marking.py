"""KAT as a phase marker: rollouts run to their end, KAT's detector only marks where the low-KL
run starts and ends, and ``supervise`` decides which phases the loss sees.

This is the KAT paper's stage-wise supervision ablation: train on pre-agreement tokens only
(``pre``), then add the agreement phase (``pre+agreement``), then the post-agreement phase
(``all``). Phases of one rollout of ``length`` tokens:

- pre-agreement ``[0, pre_end)``: before the first run of ``patience`` low windows, i.e. KAT's
  cut (``pre_end = length`` when the detector never fires);
- agreement ``[pre_end, agreement_end)``: that run, extended while its windows stay low;
  ``agreement_end`` is the end of its last low window, or ``length`` if the run lasts to the
  last evaluated window;
- post-agreement ``[agreement_end, length)``.

Detection, threshold and buffer are KAT's own (the online scan of :class:`KATTerminator`, and
:func:`kat_cut` for the run's end), so ``supervise="pre"`` trains on the tokens KAT-OPD keeps,
without stopping the rollout.
"""

from __future__ import annotations

from typing import Any

import torch

from kat_research.termination.kat import KATTerminator, kat_cut

# Settings of ``supervise``, in the order of ``phase_bounds``' columns (tokens each one keeps).
SUPERVISE = ("pre", "pre+agreement", "all")


def agreement_end(
    kl: torch.Tensor,
    cut: int,
    *,
    threshold: float,
    window: int,
    stride: int,
    patience: int,
    exempt: int = 0,
) -> int:
    """End of the low-KL run that KAT detects at ``cut`` in one rollout's KL [length].

    Every run before the detected one is shorter than ``patience``, so for ``p >= patience``
    KAT still cuts at ``cut`` iff the run holds at least ``p`` low windows: a binary search
    over ``p`` finds the run's length with the KAT scan itself.
    """
    length = kl.numel()
    last_window = (length - window) // stride
    rule = dict(threshold=threshold, window=window, stride=stride, exempt=exempt)
    lo, hi = patience, last_window - cut // stride + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kat_cut(kl, patience=mid, **rule) == cut:
            lo = mid
        else:
            hi = mid - 1
    run_end = cut // stride + lo - 1
    return length if run_end == last_window else run_end * stride + window


class KATPhaseMarker(KATTerminator):
    """KAT's detector without the stop: every rollout runs to EOS or the length cap, and only
    the phases named by ``supervise`` (``pre``, ``pre+agreement`` or ``all``) keep loss_mask=1.

    Takes :class:`KATTerminator`'s settings; logs the mean tokens per rollout of each phase
    (``kat/pre_tokens``, ``kat/agreement_tokens``, ``kat/post_tokens``).
    """

    def __init__(self, supervise: str = "pre", **kat: Any) -> None:
        if supervise not in SUPERVISE:
            raise ValueError(f"supervise must be one of {', '.join(SUPERVISE)}, got {supervise!r}")
        super().__init__(**kat)
        self.supervise = supervise
        self._bounds: torch.Tensor | None = None

    def observe(self, rows: torch.Tensor, kl: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        super().observe(rows, kl, lengths)  # the scan records cuts and minima as KAT-OPD would
        return torch.full((rows.numel(),), -1, dtype=torch.long)

    def phase_bounds(self, kl: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, 3] long: pre_end, agreement_end and length of each row of the current batch."""
        cuts = self._current_batch().cut.tolist()
        bounds = []
        for row, (cut, length) in enumerate(zip(cuts, lengths.tolist(), strict=True)):
            if cut < 0:
                bounds.append((length, length, length))
                continue
            end = agreement_end(
                kl[row, :length].detach().cpu(),
                cut,
                threshold=self._batch_threshold,
                window=self.window,
                stride=self.stride,
                patience=self.patience,
                exempt=self.exempt,
            )
            bounds.append((cut, end, length))
        return torch.tensor(bounds, dtype=torch.long).reshape(-1, 3)

    def kept_tokens(
        self, cut: torch.Tensor, kl: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        if kl is None:
            raise ValueError("KATPhaseMarker needs the teacher's per-token KL")
        self._bounds = self.phase_bounds(kl, lengths.cpu())
        keep = self._bounds[:, SUPERVISE.index(self.supervise)]
        return torch.minimum(cut, keep.to(cut.device))

    def end_batch(self) -> dict[str, float]:
        metrics = super().end_batch()
        if self._bounds is not None:
            pre, end, length = self._bounds.double().mean(0).tolist()
            metrics.update(
                {
                    "kat/pre_tokens": pre,
                    "kat/agreement_tokens": end - pre,
                    "kat/post_tokens": length - end,
                }
            )
            self._bounds = None
        return metrics

    def __repr__(self) -> str:
        return f"KATPhaseMarker(supervise={self.supervise!r}, {super().__repr__()})"
