"""The ViT decoder: a flow-matching MLP head that samples target ViT features (docs/official_behaviour.md §3.6).

``ViTDecoder.net`` is the official ``SimpleMLPAdaLN`` with the ``vit_decoder.net.`` key names of
docs/official_behaviour.md §2.1: input_proj (C -> W) and cond_embed (z -> W), a sinusoidal(256) -> MLP time embedding,
``depth`` AdaLN residual MLP blocks and a non-affine-LN final layer with its own AdaLN (no parameters of its own besides
``linear`` and ``adaLN_modulation.1``).

Sampling follows the official FlowMatchScheduler (shift 2.0, sigma_min 0.003/1.002, extra_one_step):
sigmas are computed in **bfloat16** whatever the run dtype (docs/official_behaviour.md §7.2), timesteps = 1000·sigma
(also bf16), an Euler step per timestep with sigma_next = 0 after the last one, and the model predicts
velocity = noise - x0. The scheduler finds each step's sigma by the first timestep nearest to it (argmin), exactly
as the official ``step`` does, so coinciding bf16 timesteps (>= 88 steps) behave as they do there; the lookup is
done once per schedule, not per step.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from ..errors import require
from ..ops import resolve_ops

FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000
SCHEDULE_SHIFT = 2.0  # config.json clip_diff_cfg.shift (docs/official_behaviour.md §2.1)
SIGMA_MAX = 1.0
SIGMA_MIN = 0.003 / 1.002
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE_DTYPE = torch.bfloat16  # FlowMatch sigmas are bf16 whatever the decoder (docs/official_behaviour.md §7.2)


@lru_cache(maxsize=32)
def flow_match_schedule(steps: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(sigmas, timesteps, sigma_index) on the CPU, bf16, for ``steps`` sampling steps (official set_timesteps).

    ``sigma_index[i]`` is the entry the official ``step`` uses at timestep i: the first index whose timestep
    is nearest to it (argmin). It is i unless bf16 rounding makes timesteps coincide (from 88 steps on).
    """
    require(int(steps) >= 1, f"vit_denoising_step must be at least 1 (got {steps}).")
    sigma_start = SIGMA_MIN + (SIGMA_MAX - SIGMA_MIN) * 1.0  # denoising_strength 1.0
    # extra_one_step: n+1 points, the last (sigma_min) dropped.
    sigmas = torch.linspace(sigma_start, SIGMA_MIN, steps + 1, dtype=SCHEDULE_DTYPE)[:-1]
    sigmas = SCHEDULE_SHIFT * sigmas / (1 + (SCHEDULE_SHIFT - 1) * sigmas)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    sigma_index = tuple(int(torch.argmin((timesteps - t).abs())) for t in timesteps)
    return sigmas, timesteps, sigma_index


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, ops, factory: dict):
        super().__init__()
        self.mlp = nn.Sequential(
            ops.Linear(FREQUENCY_EMBEDDING_SIZE, width, bias=True, **factory),
            nn.SiLU(),
            ops.Linear(width, width, bias=True, **factory),
        )
        self._freqs: dict[torch.device, torch.Tensor] = {}  # fp32, kept out of module dtype casts

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        freqs = self._freqs.get(device)
        if freqs is None:
            half = FREQUENCY_EMBEDDING_SIZE // 2
            freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half).to(device)
            self._freqs[device] = freqs
        return freqs

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] timesteps (in the activation dtype) -> [B, width]."""
        args = t[:, None].float() * self._frequencies(t.device)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # 256 is even: no zero pad
        return self.mlp(embedding.to(t.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int, ops, factory: dict):
        super().__init__()
        self.in_ln = ops.LayerNorm(width, eps=1e-6, **factory)
        self.mlp = nn.Sequential(
            ops.Linear(width, width, bias=True, **factory),
            nn.SiLU(),
            ops.Linear(width, width, bias=True, **factory),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 3 * width, bias=True, **factory))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(_modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int, ops, factory: dict):
        super().__init__()
        self.norm_final = ops.LayerNorm(width, elementwise_affine=False, eps=1e-6, **factory)
        self.linear = ops.Linear(width, out_channels, bias=True, **factory)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 2 * width, bias=True, **factory))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, channels: int, width: int, z_channels: int, depth: int, ops, factory: dict):
        super().__init__()
        self.time_embed = TimestepEmbedder(width, ops, factory)
        self.cond_embed = ops.Linear(z_channels, width, **factory)
        self.input_proj = ops.Linear(channels, width, **factory)
        self.res_blocks = nn.ModuleList(ResBlock(width, ops, factory) for _ in range(depth))
        self.final_layer = FinalLayer(width, channels, ops, factory)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, C] noisy features, t [1] or [B] timesteps, c [B, z] conditions -> velocity [B, C]."""
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class ViTDecoder(nn.Module):
    """State-dict keys ``net.*`` exactly as the official ``vit_decoder.`` tensors (docs/official_behaviour.md §2.1)."""

    def __init__(self, target_channels: int = 3584, z_channels: int = 3584, width: int = 4096, depth: int = 16,
                 ops=None, device=None, dtype=None):
        super().__init__()
        ops = resolve_ops(ops)
        self.channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, z_channels, depth, ops, {"device": device, "dtype": dtype})

    @torch.no_grad()
    def sample(self, z_cond: torch.Tensor, z_uncond: Optional[torch.Tensor], z_imgcond: Optional[torch.Tensor], *,
               txt_cfg: float, img_cfg: Optional[float], steps: int, noise: torch.Tensor) -> torch.Tensor:
        """Sample [n, C] features for n conditions z_* [n, z] from ``noise`` [n, C] (any dtype; cast to z's).

        Guidance (official sample_vit_decoder): 3-way when img_cfg is given and txt_cfg > 1,
        v = v_u + img_cfg·(v_i − v_u) + txt_cfg·(v_c − v_i); 2-way v = v_u + txt_cfg·(v_c − v_u) when only
        txt_cfg > 1; unguided otherwise. The branches share one noise and stay identical, so the state is
        kept once and the model runs on the rows [x; x; x] against [z_c; z_u; z_i].
        """
        if img_cfg is not None and txt_cfg > 1.0:
            branches = 3
            z = torch.cat([z_cond, z_uncond, z_imgcond], dim=0)
        elif txt_cfg > 1.0:
            branches = 2
            z = torch.cat([z_cond, z_uncond], dim=0)
        else:
            branches = 1
            z = z_cond
        n = z_cond.shape[0]
        require(tuple(noise.shape) == (n, self.channels),
                f"ViT decoder noise must have shape {(n, self.channels)}, got {tuple(noise.shape)}.")
        sigmas, timesteps, sigma_index = flow_match_schedule(int(steps))
        sigmas, timesteps = sigmas.to(z.device), timesteps.to(z.device)
        x = noise.to(device=z.device, dtype=z.dtype)
        for i, timestep in enumerate(timesteps):
            t = timestep.reshape(1).to(z.dtype)
            v = self.net(torch.cat([x] * branches, dim=0) if branches > 1 else x, t, z)
            if branches == 3:
                v_c, v_u, v_i = v.split(n, dim=0)
                v = v_u + img_cfg * (v_i - v_u) + txt_cfg * (v_c - v_i)
            elif branches == 2:
                v_c, v_u = v.split(n, dim=0)
                v = v_u + txt_cfg * (v_c - v_u)
            index = sigma_index[i]
            sigma_next = sigmas[index + 1] if index + 1 < len(timesteps) else 0  # 0 after the last step
            x = x + v * (sigma_next - sigmas[index])
        return x
