"""Full-Bernini guidance modes: which DiT passes ("arms") to run and how to combine them.

Rules: docs/official_behaviour.md §4.7 ("Full Bernini" part), §7.3 (dtypes), §7.4 (fixed ``v2v_apg``
settings, arm call order, rejection of Bernini-R names). Reference behaviour: the
official ``sample_bernini_wvitcfg`` → ``sample_one_step``.

Like the Bernini-R modes (``guidance.py``), every full-Bernini mode is a chain: the
unconditional base ε(wovae, wotxt_wovit) followed by rungs, each adding
ω·(rung − previous rung). Differences from Bernini-R:

* a rung whose ω is not > 0 may *fall back* to the previous rung: its arm is not
  evaluated and its difference is exactly 0 (official ``if cur_omega > 0.0`` tests);
* the ``*_wapg`` rungs pass each difference through the flat velocity-space
  projection P(δ, ref) = 0.2·δ_∥ + 1.0·δ_⊥ (:func:`flat_project`), ref = the rung;
* ``v2v_apg`` is x-space APG with settings fixed at η 1, momentum 0, threshold 50.

Arithmetic stays in the arms' dtype (bf16 with the official loaders, docs/official_behaviour.md §7.3) and follows
the official order of operations, so bf16 roundings match. Tensors are our spatial
latents ``[B, C, T, H, W]`` (the flat projection does not care about the layout; the
``v2v_apg`` per-frame norms need it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..errors import BerniniError
from ..tasks import NO_GUIDANCE
from .guidance import RENDERER_MODES, APGConfig, Omegas, apg_rung, flat_project, velocity_to_x0, x0_to_velocity

__all__ = ["FULL_MODES", "FULL_COMBOS", "FULL_CONTEXTS", "FullArm", "FullGuidance", "V2V_APG_SETTINGS"]

FULL_MODES: tuple = ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg", "v2v_apg")

# Source streams next to the target: none, images only, videos only, all (images then videos,
# docs/official_behaviour.md §4.2).
FULL_COMBOS: tuple = ("wovae", "wimgvae", "wvidvae", "wvae")
# The four planner-conditioned cross-attention contexts of docs/official_behaviour.md §3.7 (with/without text,
# with/without ViT plan).
FULL_CONTEXTS: tuple = ("wtxt_wvit", "wtxt_wovit", "wotxt_wvit", "wotxt_wovit")

# docs/official_behaviour.md §7.4: the official full-Bernini v2v_apg never receives the CLI
# --eta/--momentum/--norm_threshold.
V2V_APG_SETTINGS = APGConfig(eta=1.0, momentum=0.0, norm_threshold=(50.0,))


@dataclass(frozen=True)
class FullArm:
    """One full-Bernini DiT pass: source streams (``combo``) and cross-attention context."""

    combo: str
    context: str

    def __post_init__(self):
        if self.combo not in FULL_COMBOS or self.context not in FULL_CONTEXTS:
            raise ValueError(f"FullArm({self.combo!r}, {self.context!r}): combo must be one of "
                             f"{FULL_COMBOS}, context one of {FULL_CONTEXTS}")

    def __str__(self) -> str:
        return f"{self.combo}/{self.context}"


# Official names: cond_pred_<context>_<combo>.
FULL = FullArm("wvae", "wtxt_wvit")  # ε_full: every source, text and ViT plan
BASE = FullArm("wovae", "wotxt_wovit")  # unconditional baseline
SRC = FullArm("wvae", "wotxt_wovit")  # every source, no text, no plan
SRC_TXT = FullArm("wvae", "wtxt_wovit")  # every source and text, no plan
VID = FullArm("wvidvae", "wotxt_wovit")  # source videos only


@dataclass(frozen=True)
class _Rung:
    arm: FullArm
    omega: str  # Omegas field scaling this rung
    falls_back: bool  # ω not > 0 → arm not evaluated, rung = previous rung


@dataclass(frozen=True)
class _ModeSpec:
    rungs: tuple
    project: bool = False  # *_wapg: flat P(δ, ref) on every rung difference
    x_space_apg: bool = False  # v2v_apg
    only: Optional[FullArm] = None  # guidance "none": this one arm, its output the velocity


_VAE_TXT_VIT_RUNGS = (
    _Rung(SRC, "img", falls_back=True),
    _Rung(SRC_TXT, "txt", falls_back=True),
    _Rung(FULL, "tgt", falls_back=False),  # always ε_full, whatever ω_tgt
)

_MODES = {
    # base + ω_img·P(ε_src − base) + ω_txt·P(ε_txt − ε_src) + ω_tgt·P(ε_full − ε_txt); ω_vid unused
    "vae_txt_vit_wapg": _ModeSpec(_VAE_TXT_VIT_RUNGS, project=True),
    # the same rungs without projection
    "vae_txt_vit": _ModeSpec(_VAE_TXT_VIT_RUNGS),
    # base + ω_vid(ε_V − base) + ω_img(ε_VI − ε_V) + ω_txt(ε_VTI − ε_VI) + ω_tgt(ε_VTIC − ε_VTI):
    # plain differences despite the name (docs/official_behaviour.md §4.7); ε_VTIC is the ε_full arm
    "rv2v_wapg": _ModeSpec((
        _Rung(VID, "vid", falls_back=True),
        _Rung(SRC, "img", falls_back=True),
        _Rung(SRC_TXT, "txt", falls_back=True),
        _Rung(FULL, "tgt", falls_back=True),
    )),
    # x-space APG between base and ε_full, scale ω_txt (no fall-back)
    "v2v_apg": _ModeSpec((_Rung(FULL, "txt", falls_back=False),), x_space_apg=True),
}
assert set(_MODES) == set(FULL_MODES)
# Guidance "none" (not official; for step-distilled experts, docs/fast_sampling.md): ε_full alone, i.e. every
# source, the text and the ViT plan, no CFG. Kept out of FULL_MODES, the official list.
_MODES[NO_GUIDANCE] = _ModeSpec((), only=FULL)


def _skipped(rung: _Rung, omegas: Omegas) -> bool:
    # The official tests `cur_omega > 0.0`, so a negative ω also falls back.
    return rung.falls_back and not getattr(omegas, rung.omega) > 0.0


class FullGuidance:
    """Arms and guided velocity of one full-Bernini guidance mode.

    Per step: ``arms(omegas)`` lists the DiT passes to run (official order, docs/official_behaviour.md §7.4;
    batching them is fine), ``combine(eps, omegas, sample=x_t, sigma=σ)`` returns the
    guided velocity for the scheduler. ``omegas`` are the current ones (after the
    one-off ``omega_scale`` at the expert switch, which scales ω_tgt too:
    :meth:`Omegas.scaled`). No state is kept across steps; ``reset()`` exists for
    parity with :class:`RendererGuidance`.
    """

    def __init__(self, mode: str, apg: Optional[APGConfig] = None):
        """``apg`` is accepted so a loop can build either guidance the same way, and is
        ignored: full-Bernini ``v2v_apg`` always uses :data:`V2V_APG_SETTINGS` (docs/official_behaviour.md §7.4)."""
        if mode not in _MODES:
            hint = " is a Bernini-R mode and" if mode in RENDERER_MODES else ""
            raise BerniniError(
                f"guidance_mode '{mode}'{hint} is not a full-Bernini guidance mode; "
                f"choose one of {', '.join(FULL_MODES)}, or {NO_GUIDANCE} (one pass per step, no guidance)."
            )
        self.mode = mode
        self._spec = _MODES[mode]

    @property
    def uses_apg(self) -> bool:
        """x-space APG needs σ > 0 at every step: use UniPC (Euler ends at σ = 0)."""
        return self._spec.x_space_apg

    def reset(self) -> None:
        """Nothing to reset: ``v2v_apg`` starts a fresh zero-momentum buffer every step."""

    def arms(self, omegas: Omegas) -> list:
        """DiT passes for this step, each once, in the order the official first computes them.

        The official always runs ε_full then the base, then the mode's rungs, leaving out a
        fall-back rung's arm. ``rv2v_wapg`` recomputes ε_full as its last rung: we reuse the
        first result (same inputs, same output), and we drop ε_full altogether when that
        rung falls back, since the official then discards it (identical guided velocity).
        """
        if self._spec.only is not None:
            return [self._spec.only]
        rung_arms = [r.arm for r in self._spec.rungs if not _skipped(r, omegas)]
        ordered = ([FULL] if FULL in rung_arms else []) + [BASE] + rung_arms
        return list(dict.fromkeys(ordered))

    def combine(
        self,
        eps: Mapping[FullArm, torch.Tensor],
        omegas: Omegas,
        *,
        sample: Optional[torch.Tensor] = None,
        sigma=None,
    ) -> torch.Tensor:
        """Guided velocity. Chain modes: in the arms' dtype. ``v2v_apg``: x-space in the
        sample's dtype (σ·ε formed in the arms' dtype, projection in float64), which needs
        the current scheduler ``sample`` and ``sigma``."""
        missing = [str(a) for a in self.arms(omegas) if a not in eps]
        if missing:
            raise KeyError(f"guidance '{self.mode}' needs the arms {missing}")
        if self._spec.only is not None:
            return eps[self._spec.only]
        chain = self._resolve_chain(eps, omegas)
        if self._spec.x_space_apg:
            return self._x_space_apg(chain, sample, sigma)
        out = chain[0][0]
        for (previous, _), (current, omega) in zip(chain[:-1], chain[1:]):
            delta = current - previous
            if self._spec.project:
                delta = flat_project(delta, current, parallel_scale=0.2, orthogonal_scale=1.0)
            out = out + omega * delta
        return out

    def _resolve_chain(self, eps, omegas) -> list:
        """[(ε_base, None), (ε_rung, ω), ...]; a fall-back rung reuses the previous ε."""
        previous = eps[BASE]
        chain = [(previous, None)]
        for rung in self._spec.rungs:
            current = previous if _skipped(rung, omegas) else eps[rung.arm]
            chain.append((current, getattr(omegas, rung.omega)))
            previous = current
        return chain

    def _x_space_apg(self, chain, sample, sigma) -> torch.Tensor:
        if sample is None or sigma is None or float(sigma) <= 0:
            raise BerniniError(
                f"guidance_mode '{self.mode}' (APG) needs the current sample and a nonzero sigma at "
                "every step; use the UniPC scheduler (use_unipc=True)."
            )
        (base, _), (cond, omega) = chain
        x_base = velocity_to_x0(sample, base, sigma)
        x_cond = velocity_to_x0(sample, cond, sigma)
        # Momentum 0 with a buffer created afresh each step is the identity, hence no buffer.
        step = apg_rung(
            x_cond - x_base,
            x_cond,
            eta=V2V_APG_SETTINGS.eta,
            norm_threshold=V2V_APG_SETTINGS.threshold_for_rung(0),
        )
        return x0_to_velocity(sample, x_base + omega * step, sigma)
