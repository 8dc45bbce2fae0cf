"""One request's DeepSeek-V4 attention in torch (transformers 5.23 `eager_attention_forward`
with V4's shared K=V head): the queries of the step against a key set (sliding-window kv
rows, then compressed entries), each head with a learnable sink logit that joins the
softmax but carries no value."""

from __future__ import annotations

import torch


def sink_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    allowed: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [queries, heads, d], keys [keys, d] (also the values), allowed [queries, keys] bool,
    sinks [heads] -> [queries, heads, d] in q's dtype.

    Every query must be allowed at least one key (its own kv row always is).
    """
    logits = torch.einsum("qhd,kd->hqk", q, keys.to(q.dtype)) * scale
    logits = logits.float().masked_fill(~allowed[None], float("-inf"))
    sink = sinks.float()[:, None, None].expand(-1, q.shape[0], 1)
    # the sink logit is float32 (transformers keeps `sinks` in float32), so the softmax is too
    combined = torch.cat((logits, sink), dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    return torch.einsum("hqk,kd->qhd", probs.to(q.dtype), keys.to(q.dtype))
