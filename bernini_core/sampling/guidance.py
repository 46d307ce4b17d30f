"""Bernini-R guidance modes: which DiT passes ("arms") to run and how to combine them.

Rules: docs/official_behaviour.md §4.7 (Bernini-R table + APG paragraph), §7.3 (dtypes), §7.4
(arm call order). Reference behaviour: the official ``GEN_Wanx22.sample``.

Every mode is a *chain*: a base arm followed by rungs, each rung adding
ω·(rung − previous rung) in velocity space (plain CFG) or the APG-processed
difference in x-space (APG modes). This one shape covers all seven Bernini-R modes
and the rung helpers below are the building blocks for the full-Bernini modes.

Tensors are our spatial latents ``[B, C, T, H, W]``; APG norms and projections are
per frame over (C, H, W), i.e. dims (-1, -2, -4), exactly the official dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import BerniniError, require
from ..tasks import NO_GUIDANCE

__all__ = [
    "Arm",
    "NO_GUIDANCE",
    "Omegas",
    "APGConfig",
    "RENDERER_MODES",
    "RendererGuidance",
    "MomentumBuffer",
    "FRAME_DIMS",
    "clamp_frame_norm",
    "apg_project",
    "apg_rung",
    "flat_project",
    "velocity_to_x0",
    "x0_to_velocity",
]

# (C, H, W) of a [B, C, T, H, W] latent, in the order the official code lists them.
FRAME_DIMS = (-1, -2, -4)


# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Arm:
    """One DiT pass: which source streams sit next to the target, and which text.

    Bernini-R combos (docs/official_behaviour.md §4.7): ``"none"`` target only, ``"V"`` first source video,
    ``"I"`` the images, ``"VI"`` every source; text ``"pos"`` or ``"neg"``.
    The fields are plain strings so other modes can bring their own vocabulary.
    """

    combo: str
    text: str

    def __str__(self) -> str:
        return f"{self.combo}/{self.text}"


NONE_NEG, NONE_POS = Arm("none", "neg"), Arm("none", "pos")
V_NEG = Arm("V", "neg")
I_NEG, I_POS = Arm("I", "neg"), Arm("I", "pos")
VI_NEG, VI_POS = Arm("VI", "neg"), Arm("VI", "pos")


@dataclass(frozen=True)
class Omegas:
    """Guidance scales (CLI ``--omega_vid/img/txt/tgt``). Bernini-R ignores ``tgt``."""

    vid: float
    img: float
    txt: float
    tgt: float = 0.5

    def scaled(self, factor: float) -> "Omegas":
        """All scales times ``factor`` (``omega_scale``, applied once at the first
        low-noise step, docs/official_behaviour.md §4.5); Python float products like the official loop."""
        return Omegas(self.vid * factor, self.img * factor, self.txt * factor, self.tgt * factor)


@dataclass(frozen=True)
class APGConfig:
    """Adaptive Projected Guidance settings (CLI ``--eta --momentum --norm_threshold``).

    ``norm_threshold`` may be one number or a sequence; rung *i* of a mode uses
    element *i* (the last one when the sequence is shorter), which is what the
    official code does: single-condition modes read element 0, ``r2v_apg`` reads
    elements 0 and 1 (a single value is used for both). ≤ 0 disables clamping.
    """

    eta: float = 0.5
    momentum: float = 0.0
    norm_threshold: Union[float, Sequence[float]] = (50.0, 50.0, 50.0)

    def __post_init__(self):
        values = self.norm_threshold
        values = (values,) if isinstance(values, (int, float)) else tuple(values)
        require(len(values) >= 1, "norm_threshold needs at least one value (official default: 50 50 50).")
        object.__setattr__(self, "norm_threshold", tuple(float(v) for v in values))

    def threshold_for_rung(self, rung: int) -> float:
        return self.norm_threshold[min(rung, len(self.norm_threshold) - 1)]


# --------------------------------------------------------------------------- #
# Reusable APG pieces
# --------------------------------------------------------------------------- #
class MomentumBuffer:
    """Running average r ← d + momentum·r (starts at 0), one per guided rung.

    Lives across sampling steps; the official creates one per video.
    """

    def __init__(self, momentum: float):
        self.momentum = float(momentum)
        self.running = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        previous = 0 if self.running is None else self.running
        self.running = diff + self.momentum * previous
        return self.running


def clamp_frame_norm(diff: torch.Tensor, threshold: float, dims=FRAME_DIMS) -> torch.Tensor:
    """Scale ``diff`` by min(1, threshold/‖diff‖) with the norm over ``dims``, in diff's dtype."""
    norm = diff.norm(p=2, dim=list(dims), keepdim=True)
    return diff * torch.minimum(torch.ones_like(diff), threshold / norm)


def apg_project(diff: torch.Tensor, ref: torch.Tensor, eta: float, dims=FRAME_DIMS) -> torch.Tensor:
    """diff_⊥ + η·diff_∥ with respect to the unit direction of ``ref`` over ``dims``.

    The projection is done in float64 and both parts are cast back to diff's dtype
    before being combined (the official order of roundings).
    """
    d64 = diff.double()
    unit = F.normalize(ref.double(), dim=list(dims))
    parallel = (d64 * unit).sum(dim=list(dims), keepdim=True) * unit
    orthogonal = d64 - parallel
    return orthogonal.to(diff.dtype) + eta * parallel.to(diff.dtype)


def apg_rung(
    diff: torch.Tensor,
    ref: torch.Tensor,
    *,
    eta: float,
    norm_threshold: float,
    buffer: Optional[MomentumBuffer] = None,
    dims=FRAME_DIMS,
) -> torch.Tensor:
    """One APG rung: momentum average, per-frame norm clamp, then projection on ``ref``."""
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        diff = clamp_frame_norm(diff, norm_threshold, dims)
    return apg_project(diff, ref, eta, dims)


def flat_project(
    delta: torch.Tensor,
    ref: torch.Tensor,
    parallel_scale: float = 0.2,
    orthogonal_scale: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """parallel_scale·δ_∥ + orthogonal_scale·δ_⊥ over the whole flattened tensor per
    batch row, in the tensors' own dtype: the velocity-space projection P(δ, ref)
    of the full-Bernini ``*_wapg`` modes (docs/official_behaviour.md §4.7), with ‖ref‖² clamped at ``eps``."""
    rows = delta.shape[0]
    d, r = delta.reshape(rows, -1), ref.reshape(rows, -1)
    coeff = (d * r).sum(dim=1, keepdim=True) / (r * r).sum(dim=1, keepdim=True).clamp_min(eps)
    parallel = coeff * r
    orthogonal = d - parallel
    return parallel_scale * parallel.reshape_as(delta) + orthogonal_scale * orthogonal.reshape_as(delta)


def _sigma_scalar(sigma) -> torch.Tensor:
    """σ as a 0-dim float32 CPU tensor: the official multiplies by the scheduler's
    CPU float32 sigma, so σ·ε is computed in ε's dtype (bf16 arms → bf16 product)."""
    return torch.as_tensor(sigma, dtype=torch.float32).detach().to("cpu").reshape(())


def velocity_to_x0(sample: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """x̂ = x_t − σ·v (flow convention x_t = (1−σ)·x0 + σ·noise, v = noise − x0)."""
    return sample - _sigma_scalar(sigma) * velocity


def x0_to_velocity(sample: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v̂ = (x_t − x̂) / σ, the inverse of :func:`velocity_to_x0`."""
    return (sample - x0) / _sigma_scalar(sigma)


# --------------------------------------------------------------------------- #
# Modes
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Rung:
    arm: Arm
    omega: str  # Omegas field that scales this rung
    skip_when_zero: bool = False  # leave the arm out (reuse the previous rung) when ω == 0


@dataclass(frozen=True)
class _ModeSpec:
    base: Arm
    rungs: tuple
    apg: bool  # False: velocity-space CFG chain; True: x-space APG chain

    def rung_arms(self, omegas: Omegas) -> list:
        return [
            r.arm for r in self.rungs if not (r.skip_when_zero and getattr(omegas, r.omega) == 0)
        ]


# Base arm first, then rungs: this is also the official call order (docs/official_behaviour.md §7.4). None of the
# Bernini-R modes skips an arm when its ω is 0 (the official sample() always runs them all).
_MODES = {
    # ε∅ + ω_vid(εV − ε∅) + ω_img(εVI − εV) + ω_txt(εVI(T) − εVI)
    "rv2v": _ModeSpec(NONE_NEG, (_Rung(V_NEG, "vid"), _Rung(VI_NEG, "img"), _Rung(VI_POS, "txt")), apg=False),
    # εVI + ω_txt(εVI(T) − εVI)
    "v2v": _ModeSpec(VI_NEG, (_Rung(VI_POS, "txt"),), apg=False),
    # ε∅ + ω_vid(εV − ε∅) + ω_txt(εVI(T) − εV)
    "v2v_chain": _ModeSpec(NONE_NEG, (_Rung(V_NEG, "vid"), _Rung(VI_POS, "txt")), apg=False),
    # ε∅ + ω_txt(ε∅(T) − ε∅)
    "t2v": _ModeSpec(NONE_NEG, (_Rung(NONE_POS, "txt"),), apg=False),
    # chained APG ∅ → I → I(T) with ω_img, ω_txt
    "r2v_apg": _ModeSpec(NONE_NEG, (_Rung(I_NEG, "img"), _Rung(I_POS, "txt")), apg=True),
    # APG(VI(T) vs VI), ω_txt
    "v2v_apg": _ModeSpec(VI_NEG, (_Rung(VI_POS, "txt"),), apg=True),
    # APG(∅(T) vs ∅), ω_txt
    "t2v_apg": _ModeSpec(NONE_NEG, (_Rung(NONE_POS, "txt"),), apg=True),
}

RENDERER_MODES: tuple = ("rv2v", "v2v", "v2v_chain", "t2v", "r2v_apg", "v2v_apg", "t2v_apg")
assert set(RENDERER_MODES) == set(_MODES)
# Guidance "none" (not official; for step-distilled experts): the one arm the official calls εVI(T), every source
# and the positive text, whose output is the velocity unchanged: no CFG, as lightx2v's distill configs
# (enable_cfg false, docs/fast_sampling.md). Kept out of RENDERER_MODES, the official list.
_MODES[NO_GUIDANCE] = _ModeSpec(VI_POS, (), apg=False)


class RendererGuidance:
    """Arms and guided velocity of one Bernini-R guidance mode, for one video.

    Per step: ``arms(omegas)`` lists the DiT passes to run (official order; batching
    them is fine), ``combine(eps, omegas, sample=x_t, sigma=σ)`` returns the guided
    velocity for the scheduler. APG modes keep momentum state across steps;
    call ``reset()`` before the next video.
    """

    def __init__(self, mode: str, apg: APGConfig = APGConfig()):
        if mode not in _MODES:
            raise BerniniError(
                f"guidance_mode '{mode}' is not a Bernini-R mode; choose one of {', '.join(RENDERER_MODES)}, "
                f"or {NO_GUIDANCE} (one pass per step, no guidance)."
            )
        self.mode = mode
        self.apg = apg
        self._spec = _MODES[mode]
        self.reset()

    @property
    def uses_apg(self) -> bool:
        """APG modes work in x-space and need σ > 0 at every step: use UniPC (the official
        CLI says so; with the Euler fallback the last σ is 0 and the official output is NaN)."""
        return self._spec.apg

    def reset(self) -> None:
        n = len(self._spec.rungs) if self._spec.apg else 0
        self._buffers = [MomentumBuffer(self.apg.momentum) for _ in range(n)]

    def arms(self, omegas: Omegas) -> list:
        return [self._spec.base] + self._spec.rung_arms(omegas)

    def combine(
        self, eps: Mapping[Arm, torch.Tensor], omegas: Omegas, *, sample: torch.Tensor, sigma
    ) -> torch.Tensor:
        """Guided velocity. Plain CFG modes: in the arms' dtype. APG modes: float32
        (x-space in the sample's float32, projection in float64), σ = the scheduler's
        current sigma, as the official ``_apg_sigma``."""
        missing = [str(a) for a in self.arms(omegas) if a not in eps]
        if missing:
            raise KeyError(f"guidance '{self.mode}' needs the arms {missing}")
        chain = self._resolve_chain(eps, omegas)
        if not self._spec.apg:
            return _cfg_chain(chain)
        if float(sigma) <= 0:
            raise BerniniError(
                f"guidance_mode '{self.mode}' (APG) needs a nonzero sigma at every step; "
                "use the UniPC scheduler (use_unipc=True)."
            )
        return self._apg_chain(chain, sample, sigma)

    def _resolve_chain(self, eps, omegas):
        """[(ε_base, None), (ε_rung, ω, rung_index), ...]; a skipped rung reuses the previous ε."""
        base = eps[self._spec.base]
        chain, previous = [(base, None, None)], base
        for index, rung in enumerate(self._spec.rungs):
            omega = getattr(omegas, rung.omega)
            current = previous if (rung.skip_when_zero and omega == 0) else eps[rung.arm]
            chain.append((current, omega, index))
            previous = current
        return chain

    def _apg_chain(self, chain, sample: torch.Tensor, sigma) -> torch.Tensor:
        xs = [velocity_to_x0(sample, e, sigma) for e, _, _ in chain]
        guided = xs[0]
        for (_, omega, index), prev_x, cur_x in zip(chain[1:], xs[:-1], xs[1:]):
            step = apg_rung(
                cur_x - prev_x,
                cur_x,
                eta=self.apg.eta,
                norm_threshold=self.apg.threshold_for_rung(index),
                buffer=self._buffers[index],
            )
            guided = guided + omega * step
        return x0_to_velocity(sample, guided, sigma)


def _cfg_chain(chain) -> torch.Tensor:
    """ε_base + Σ ω_i·(ε_i − ε_{i−1}), summed left to right like the official expressions."""
    out = chain[0][0]
    for (prev, _, _), (cur, omega, _) in zip(chain[:-1], chain[1:]):
        out = out + omega * (cur - prev)
    return out
