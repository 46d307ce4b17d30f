"""Sampling stage: flow schedulers and the Bernini-R guidance modes."""

from .guidance import (
    RENDERER_MODES,
    APGConfig,
    Arm,
    MomentumBuffer,
    Omegas,
    RendererGuidance,
    apg_project,
    apg_rung,
    clamp_frame_norm,
    flat_project,
    velocity_to_x0,
    x0_to_velocity,
)
from .schedulers import FlowEulerScheduler, FlowUniPCScheduler, expert_split, make_scheduler, shift_sigmas

__all__ = [
    "FlowUniPCScheduler",
    "FlowEulerScheduler",
    "make_scheduler",
    "expert_split",
    "shift_sigmas",
    "Arm",
    "Omegas",
    "APGConfig",
    "RENDERER_MODES",
    "RendererGuidance",
    "MomentumBuffer",
    "apg_project",
    "apg_rung",
    "clamp_frame_norm",
    "flat_project",
    "velocity_to_x0",
    "x0_to_velocity",
]
