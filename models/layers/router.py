"""MoE routing: which experts each token goes to and with what weight, per model family.

Each function takes the gate's logits [rows, num_experts] and returns
``(topk_weights float32 [rows, k], topk_ids int64 [rows, k])``. Rows at or beyond
`num_valid` are padding: their ids are -1 (route nowhere, see `fused_experts`) and their
weights 0, so no expert computes them and the all-to-all backend never sends them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_padding(
    weights: torch.Tensor, ids: torch.Tensor, num_valid: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows >= `num_valid` route nowhere (None: every row is real). A device scalar masks
    without a host sync, so a CUDA graph masks each replay's own padding."""
    if isinstance(num_valid, torch.Tensor):
        real = (torch.arange(ids.shape[0], device=ids.device) < num_valid).unsqueeze(1)
        return torch.where(real, weights, 0.0), torch.where(real, ids, -1)
    if num_valid is not None and num_valid < ids.shape[0]:
        ids[num_valid:] = -1
        weights[num_valid:] = 0.0
    return weights, ids


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, num_valid: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE (transformers `Qwen3MoeTopKRouter`): softmax in float32 over all experts,
    top-k, then the k weights rescaled to sum to 1 when `renormalize` (`norm_topk_prob`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return mask_padding(weights, ids.long(), num_valid)


def grouped_topk(
    logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
    renormalize: bool,
    num_valid: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 (transformers `DeepseekV3TopkRouter`), with `logits` from float32 inputs.

    Sigmoid scores; the choice uses scores + `correction_bias` (e_score_correction_bias):
    each of `n_group` expert groups is scored by the sum of its two best biased scores, the
    best `topk_group` groups stay eligible, and the top-k biased scores among their experts
    are chosen. The weights are the chosen experts' unbiased scores, renormalised when
    `renormalize` (`norm_topk_prob`), times `routed_scaling_factor`.
    """
    rows, num_experts = logits.shape
    if num_experts % n_group:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({n_group})")
    scores = logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    per_group = num_experts // n_group
    group_scores = choice.view(rows, n_group, per_group).topk(min(2, per_group), dim=-1)[0]
    group_idx = torch.topk(group_scores.sum(dim=-1), k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros(rows, n_group, dtype=torch.bool, device=logits.device)
    group_mask.scatter_(1, group_idx, True)
    expert_mask = group_mask.repeat_interleave(per_group, dim=1)
    choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return mask_padding(weights, ids.long(), num_valid)


def sqrtsoftplus_topk(
    logits: torch.Tensor,
    top_k: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
    num_valid: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 (transformers `DeepseekV4TopKRouter`): scores sqrt(softplus(logits)) in
    the logits' dtype; the top-k of scores + `correction_bias` choose (no expert groups);
    the weights are the chosen unbiased scores, always renormalised, times
    `routed_scaling_factor`."""
    scores = F.softplus(logits).sqrt()
    choice = scores if correction_bias is None else scores + correction_bias
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    return _v4_weights(scores, ids, routed_scaling_factor, num_valid)


def hash_route(
    logits: torch.Tensor,
    tid2eid: torch.Tensor,
    input_ids: torch.Tensor,
    routed_scaling_factor: float,
    num_valid: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's hash layers (transformers `DeepseekV4HashRouter`): each row's experts
    are its token's row of the frozen table `tid2eid` [vocab, k]; `input_ids` [rows] are
    the token ids of exactly these rows. Weights as `sqrtsoftplus_topk`'s."""
    if input_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} token ids for {logits.shape[0]} rows")
    ids = tid2eid[input_ids].long()
    return _v4_weights(F.softplus(logits).sqrt(), ids, routed_scaling_factor, num_valid)


def _v4_weights(
    scores: torch.Tensor, ids: torch.Tensor, scale: float, num_valid: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale
    return mask_padding(weights.float(), ids.long(), num_valid)
