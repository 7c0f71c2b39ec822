"""The specification of the pixel InfoNCE loss: the N x N matrix in plain torch autograd.

Eq. 2 of Vayyat et al., "CLUDA: Contrastive Learning in Unsupervised Domain Adaptation for Semantic
Segmentation", generalised as in DESIGN.md ("The loss contract"). With s_ij = v_i . v_j / tau:

    eligible(i, j) = i != j, valid(i), valid(j), groups[i] == groups[j],
                     not (exclusive[i] and exclusive[j])
    P_i = {j eligible, labels[j] == labels[i]},   N_i = {j eligible, labels[j] != labels[i]}
    L_i = 1/|P_i| * sum_{p in P_i} u_p * [log(exp(s_ip) + sum_{n in N_i} exp(s_in)) - s_ip]

and L_i = 0 when i is invalid or P_i is empty. Every exponential is taken of t = s - 1/tau, which
lies in [-2/tau, 0] because the v are unit vectors; the factor exp(1/tau) cancels inside each
bracket, so no running maximum is needed. This module holds O(N^2) memory: small N only. It is the
baseline the tiled torch path and the Triton kernels are tested against.
"""
from typing import Optional

import torch


def reference_pixel_infonce(
    v: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    groups: Optional[torch.Tensor] = None,
    exclusive: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Per-anchor InfoNCE loss from the full similarity matrix.

    Args:
        v: (N, C) unit-length features (float32 or float64; the result has v's dtype).
        labels: (N,) integer labels.
        temperature: tau > 0.
        groups: (N,) integer group ids or None.
        exclusive: (N,) bool or None.
        pos_weight: (N,) weight u_j of the positive term of partner j, or None (all ones).
        ignore_index: label of ignored pixels (negative labels are ignored too).

    Returns:
        (N,) loss per anchor, differentiable w.r.t. v and pos_weight.
    """
    n = v.shape[0]
    valid = (labels >= 0) & (labels != ignore_index)
    eligible = valid[:, None] & valid[None, :]
    eligible &= ~torch.eye(n, dtype=torch.bool, device=v.device)
    if groups is not None:
        eligible &= groups[:, None] == groups[None, :]
    if exclusive is not None:
        eligible &= ~(exclusive[:, None] & exclusive[None, :])
    same_label = labels[:, None] == labels[None, :]
    pos = eligible & same_label  # (N, N)
    neg = eligible & ~same_label  # (N, N)

    t = (v @ v.t() - 1.0) / temperature  # (N, N), s - 1/tau in [-2/tau, 0]
    e = torch.exp(t)
    neg_sum = torch.where(neg, e, torch.zeros_like(e)).sum(1)  # (N,) Neg_i * exp(-1/tau)
    # log(exp(s_ip) + Neg_i) - s_ip = log(e_ip + Neg_i e^{-1/tau}) - t_ip. The clamp only matters
    # for tau < 2 / 87 (exp(-2/tau) underflows float32), where it keeps the result finite.
    denom = (e + neg_sum[:, None]).clamp_min(torch.finfo(v.dtype).tiny)
    terms = torch.log(denom) - t
    if pos_weight is not None:
        terms = terms * pos_weight.to(v.dtype)[None, :]
    terms = torch.where(pos, terms, torch.zeros_like(terms))
    num_pos = pos.sum(1)
    return terms.sum(1) / num_pos.clamp_min(1).to(v.dtype)
