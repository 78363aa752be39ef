"""KAT as a phase marker: rollouts run to their end, KAT's detector only marks where the low-KL
run starts and ends, and ``supervise`` decides which phases the loss sees.

This is the KAT paper's stage-wise supervision ablation: train on pre-agreement tokens only
(``pre``), then add the agreement phase (``pre+agreement``), then the post-agreement phase
(``all``). The phases are those of :mod:`kat_research.termination.phases`, split at the cut
of KAT's own online scan (threshold and buffer as in :class:`KATTerminator`), so
``supervise="pre"`` trains on the tokens KAT-OPD keeps, without stopping the rollout.
"""

from __future__ import annotations

import torch

from kat_research.termination.kat import KATTerminator
from kat_research.termination.kat_rule import KATRule
from kat_research.termination.phases import segments_at_cut

# Settings of ``supervise``, in the order of ``phase_bounds``' columns (tokens each one keeps).
SUPERVISE = ("pre", "pre+agreement", "all")


class KATPhaseMarker(KATTerminator):
    """KAT's detector without the stop: every rollout runs to EOS or the length cap, and only
    the phases named by ``supervise`` (``pre``, ``pre+agreement`` or ``all``) keep loss_mask=1.

    Takes KAT's rule whole, as :class:`KATTerminator` does; logs the mean tokens per rollout of
    each phase (``kat/pre_tokens``, ``kat/agreement_tokens``, ``kat/post_tokens``).
    """

    supports_partial = False  # its phase bounds are computed per sync batch

    def __init__(self, rule: KATRule, supervise: str = "pre") -> None:
        if supervise not in SUPERVISE:
            raise ValueError(f"supervise must be one of {', '.join(SUPERVISE)}, got {supervise!r}")
        super().__init__(rule)
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
            segments = segments_at_cut(
                kl[row, :length].detach().cpu(),
                cut if cut >= 0 else None,
                self.rule,
                threshold=self._batch_threshold,
            )
            bounds.append((segments.pre_end, segments.agreement_end, segments.length))
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
        return f"KATPhaseMarker({self.rule!r}, supervise={self.supervise!r})"
