"""Projection of gradients onto the top singular subspace of a training update (KAT paper §3.2).

For a weight matrix W with update ΔW = θ_final − θ_init and U_k its top-k left singular
vectors, a gradient g of W's shape has ρ_k = ‖U_k U_kᵀ g‖² / ‖g‖² = ‖U_kᵀ g‖² / ‖g‖²: the share
of g's energy inside the k-dimensional column space where training moved W. A random direction
has E[ρ_k] = k / rows(W). Over a group of matrices, ρ is the ratio of summed energies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")


def top_left_singular_vectors(delta: torch.Tensor, k: int) -> torch.Tensor:
    """U_k [rows, min(k, rows, cols)] of ``delta``, computed in float64."""
    u, _, _ = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :k]


def projected_energy(g: torch.Tensor, basis: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """‖U_kᵀ g‖² for each k in ``ks`` (k clipped to the basis width), float64 [len(ks)]."""
    coefficients = basis.T.double() @ g.double()  # [width, cols]
    cumulative = coefficients.square().sum(-1).cumsum(0)
    return torch.stack([cumulative[min(k, basis.shape[1]) - 1] for k in ks])


def projection_ratios(g: torch.Tensor, basis: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """ρ_k of one gradient matrix for each k in ``ks`` (NaN for a zero gradient)."""
    total = float(g.double().square().sum())
    energy = projected_energy(g, basis, ks)
    return energy / total if total else energy * float("nan")


def parameter_groups(name: str) -> list[str]:
    """Groups a weight matrix is reported in: ``all``, ``attention`` or ``mlp``, ``layer<i>``."""
    groups = ["all"]
    if ".self_attn." in name:
        groups.append("attention")
    elif ".mlp." in name:
        groups.append("mlp")
    if match := _LAYER.search(name):
        groups.append(f"layer{match.group(1)}")
    return groups


def group_order(group: str) -> tuple[int, int]:
    """Sort key: ``all``, ``attention``, ``mlp``, then layers by index."""
    fixed = {"all": 0, "attention": 1, "mlp": 2}
    return (fixed[group], 0) if group in fixed else (3, int(group.removeprefix("layer")))


def group_ratios(
    gradients: Mapping[str, torch.Tensor],
    bases: Mapping[str, torch.Tensor],
    ks: Sequence[int],
) -> dict[str, torch.Tensor]:
    """ρ_k per parameter group: summed projected energy over summed energy, [len(ks)] each."""
    inside: dict[str, torch.Tensor] = {}
    total: dict[str, float] = {}
    for name, g in gradients.items():
        energy = projected_energy(g, bases[name], ks)
        norm = float(g.double().square().sum())
        for group in parameter_groups(name):
            inside[group] = inside.get(group, torch.zeros(len(ks), dtype=torch.float64)) + energy
            total[group] = total.get(group, 0.0) + norm
    return {
        g: inside[g] / total[g] if total[g] else inside[g] * float("nan")
        for g in sorted(inside, key=group_order)
    }
