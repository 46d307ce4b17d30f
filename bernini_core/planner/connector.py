"""The planner's MLP connector: Qwen hidden states -> ViT-space conditions and renderer context rows.

Parameter names are the official ``connector.`` keys (docs/official_behaviour.md §2.1): ``proj_gen.{0,2,3}`` and
``pred_vit.{0,2,3,4}``; the integer gaps are the parameter-free GELUs. ``pred_vit`` (Linear, GELU, Linear,
RMSNorm, Linear) conditions the ViT decoder during planning (docs/official_behaviour.md §3.1); ``proj_gen`` (Linear,
GELU, RMSNorm, Linear) turns every hidden_states[-2] row into a 4096-d renderer context row
(docs/official_behaviour.md §3.7). GELU is the exact (erf) form and the RMSNorm eps 1e-6, as in the official
``MLPConnector``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import resolve_ops


class ConnectorRMSNorm(nn.Module):
    """RMSNorm computed in fp32 on ``x.float()``, weight applied in fp32, result cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # fp32 activations times the (possibly bf16) weight promote to fp32 before the cast back, as official.
        return (x * self.weight.to(x.device)).to(out_dtype)


class Connector(nn.Module):
    def __init__(self, hidden: int, gen_dim: int = 4096, vit_dim: int = 3584, ops=None, device=None, dtype=None):
        super().__init__()
        ops = resolve_ops(ops)
        factory = {"device": device, "dtype": dtype}
        self.proj_gen = nn.Sequential(
            ops.Linear(hidden, gen_dim, **factory),
            nn.GELU(),
            ConnectorRMSNorm(gen_dim, **factory),
            ops.Linear(gen_dim, gen_dim, **factory),
        )
        self.pred_vit = nn.Sequential(
            ops.Linear(hidden, vit_dim, **factory),
            nn.GELU(),
            ops.Linear(vit_dim, vit_dim, **factory),
            ConnectorRMSNorm(vit_dim, **factory),
            ops.Linear(vit_dim, vit_dim, **factory),
        )

    @staticmethod
    def _project(head: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        # The official connector brings its input to its own dtype first; planning casts the connector to the
        # run dtype beforehand (docs/official_behaviour.md §7.3), so this is a no-op there and only guards mixed-dtype
        # callers.
        weight = head[0].weight
        if weight.dtype != h.dtype and weight.device.type != "meta":
            h = h.to(weight.dtype)
        return head(h)

    def for_vit(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vit_dim]: the condition z of the ViT decoder."""
        return self._project(self.pred_vit, h)

    def for_gen(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., gen_dim]: renderer cross-attention context rows."""
        return self._project(self.proj_gen, h)
