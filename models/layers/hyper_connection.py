"""DeepSeek-V4's manifold-constrained hyper-connections (mHC), as transformers 5.23's
`DeepseekV4HyperConnection` / `DeepseekV4HyperHead` compute them.

The residual stream is `hc_mult` (n) streams per token, x [rows, n, D]. Around every block
a `HyperConnection` collapses the streams into the block's input with weights `pre`, and
`hc_post` expands the block's output back with weights `post` while mixing the old
streams with `comb`, a Sinkhorn-normalised (doubly stochastic) n x n matrix. `HyperHead`
collapses the streams once more before the final norm. The weights are computed in
float32 from float32 parameters whatever the model dtype (transformers keeps these modules
in float32). Everything is per token and replicated: no KV state, no collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.norm import rms_norm_unweighted


def _fp32_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)


class HyperConnection(nn.Module):
    """Parameters `fn` [(2 + n) * n, n * D], `base` [(2 + n) * n] and `scale` [3] (pre,
    post, comb); saved as ``hc_attn_fn`` ... beside the layer (see deepseek_v4_weights)."""

    def __init__(
        self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float
    ) -> None:
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        mixes = (2 + hc_mult) * hc_mult
        self.fn = _fp32_param(mixes, hc_mult * hidden_size)
        self.base = _fp32_param(mixes)
        self.scale = _fp32_param(3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [rows, n, D] -> (post [rows, n], comb [rows, n, n], both float32; the
        collapsed block input [rows, D] in x's dtype)."""
        n = self.n
        flat = rms_norm_unweighted(x.flatten(1).float(), self.norm_eps)  # 0 rows too
        mix = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        # Sinkhorn-Knopp: columns first, then (rows, columns) alternately
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
        return post, comb, collapsed


def hc_post(
    x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """The streams after a block: out[k] = post[k] * y + sum_j comb[j, k] * x[j]. `comb` is
    consumed transposed (Sinkhorn leaves it non-symmetric, so the direction matters)."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(
        comb.to(dtype).transpose(-1, -2), x
    )


class HyperHead(nn.Module):
    """The final collapse (no Sinkhorn, no post/comb): parameters `hc_fn` [n, n * D],
    `hc_base` [n], `hc_scale` [1], the saved names under ``model.hc_head``."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = _fp32_param(hc_mult, hc_mult * hidden_size)
        self.hc_base = _fp32_param(hc_mult)
        self.hc_scale = _fp32_param(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, n, D] -> [rows, D] in x's dtype."""
        flat = rms_norm_unweighted(x.flatten(1).float(), self.norm_eps)
        mix = F.linear(flat, self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
