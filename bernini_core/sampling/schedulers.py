"""Flow-matching samplers for the renderer: UniPC (the official default) and Euler.

Both work on our spatial target latent ``[B, 16, T, H, W]`` (float32). The
official sampler packs it as ``b (t h w) (ph pw c)``; every operation here is
elementwise, so the layout does not change a single number.

Fidelity notes (docs/official_behaviour.md §4.6, §7.3; docs/wan_qwen.md §1.6):

* UniPC reproduces diffusers 0.35.2 (the official environment pin, docs/official_behaviour.md §6.4)
  ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
  solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")``.
  Its flow sigmas come from ``1 - linspace(1, 1/T, n+1)``, i.e. raw
  ``linspace(0.999, 0, n+1)[:-1]``. Later diffusers (e.g. 0.42) start from
  ``linspace(1, 1/T, n+1)`` instead, which gives other timesteps (3 steps at shift 5: 999/909/714 instead of
  the officially observed 999/908/713), so we build the sigmas ourselves.
* Scalar coefficients are 0-dim float32 CPU tensors computed with the same torch
  operations, in the same order, as diffusers; they only depend on the schedule, so
  they are computed once in ``set_timesteps`` rather than at every step.
* Euler reproduces the official ``FlowMatchScheduler(shift, sigma_min=0,
  extra_one_step=False)``: a bfloat16 schedule, timestep lookup by nearest value.
* Distill (not official: for step-distilled experts such as the lightx2v 4-step LoRAs) reproduces lightx2v's
  ``WanStepDistillScheduler`` (docs/fast_sampling.md §2): sigmas picked from a 1000-entry shifted float32 table at
  the integer timesteps of ``denoising_step_list``; each step predicts x0 = x − σ·v and re-noises it to the next σ
  with the same velocity (no fresh noise), the last step returns x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import BerniniError, require
from ..tasks import SAMPLER_NAMES

__all__ = [
    "FlowUniPCScheduler",
    "FlowEulerScheduler",
    "FlowDistillScheduler",
    "DISTILL_STEP_LIST",
    "distill_timesteps",
    "make_scheduler",
    "expert_split",
    "shift_sigmas",
]


def shift_sigmas(sigmas, shift: float):
    """Flow time shift σ' = s·σ / (1 + (s − 1)·σ) (docs/wan_qwen.md §1.6), in the input's dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def expert_split(timesteps, boundary: float = 0.875, num_train_timesteps: int = 1000) -> int:
    """Number of leading steps run by the high-noise expert (docs/official_behaviour.md §4.5).

    The official loop picks the high expert while ``t >= boundary * num_train_timesteps``.
    The comparison is done elementwise on the timesteps tensor itself so that it uses
    the same dtype promotion as the official scalar comparison (int64 → float32,
    bfloat16 stays bfloat16).
    """
    timesteps = torch.as_tensor(timesteps)
    return int((timesteps >= boundary * num_train_timesteps).sum().item())


class _StepCounter:
    """The step index bookkeeping both schedulers share."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    _step_index: int = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def current_sigma(self) -> float:
        """σ of the step about to be taken (the official APG x-space sigma, docs/official_behaviour.md §4.7)."""
        return float(self.sigmas[min(self._step_index, self.num_inference_steps - 1)])

    @property
    def current_timestep(self) -> torch.Tensor:
        return self.timesteps[self._step_index]

    def _check_can_step(self) -> None:
        if not hasattr(self, "timesteps"):
            raise RuntimeError("call set_timesteps() before step()")
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError(
                f"all {self.num_inference_steps} steps were already taken; call set_timesteps() again"
            )


# --------------------------------------------------------------------------- #
# UniPC (predictor-corrector, B(h) = e^h − 1, data prediction)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _UpdateCoefficients:
    """Scalars of one UniP or UniC update x' = ratio·x − c_m0·m0 − c_res·(residual).

    ``rk`` is only set for a second-order update; ``rho_prev`` / ``rho_now`` only
    for the corrector (``rho_prev`` None when it is first order).
    """

    order: int
    ratio: torch.Tensor
    c_m0: torch.Tensor
    c_res: torch.Tensor
    rk: Optional[torch.Tensor] = None
    rho_prev: Optional[torch.Tensor] = None
    rho_now: Optional[torch.Tensor] = None


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log α − log σ with α = 1 − σ (flow sigmas), float32 like diffusers."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _unipc_coefficients(
    sigmas: torch.Tensor, target: int, source: int, order: int, corrector: bool
) -> _UpdateCoefficients:
    """Coefficients of the update from sigmas[source] to sigmas[target].

    A second-order update also uses the model output at sigmas[source − 1].
    Mirrors diffusers' multistep_uni_{p,c}_bh_update op for op (bh2, predict_x0).
    """
    sigma_t, sigma_s0 = sigmas[target], sigmas[source]
    alpha_t = 1 - sigma_t
    lambda_t, lambda_s0 = _log_snr(sigma_t), _log_snr(sigma_s0)
    h = lambda_t - lambda_s0

    rk = None
    rks = [torch.ones((), dtype=torch.float32)]
    if order == 2:
        rk = (_log_snr(sigmas[source - 1]) - lambda_s0) / h
        rks = [rk, rks[0]]
    rks = torch.stack(rks)

    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2
    coeffs = dict(
        order=order,
        ratio=sigma_t / sigma_s0,
        c_m0=alpha_t * h_phi_1,
        c_res=alpha_t * b_h,
        rk=rk,
    )
    if not corrector:
        return _UpdateCoefficients(**coeffs)  # order-2 predictor uses ρ = 0.5 (exact)

    if order == 1:
        rhos = torch.full((1,), 0.5, dtype=torch.float32)
    else:
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        rows, rhs = [], []
        for k in range(1, order + 1):
            rows.append(torch.pow(rks, k - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rhos = torch.linalg.solve(torch.stack(rows), torch.stack(rhs))
    return _UpdateCoefficients(
        **coeffs, rho_prev=rhos[0] if order == 2 else None, rho_now=rhos[-1]
    )


class FlowUniPCScheduler(_StepCounter):
    """UniPC multistep sampler for flow-prediction models (the official default).

    ``step(velocity, sample)`` converts the velocity to a data prediction
    x0 = x − σ·v, corrects the current sample with it (UniC, from the second step
    on), then predicts the next sample (UniP). Orders: 1 on the first and the last
    step (warm-up, ``lower_order_final``), ``solver_order`` elsewhere.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000, solver_order: int = 2):
        require(
            solver_order in (1, 2),
            f"solver_order={solver_order} is not supported; the Bernini renderer uses 2 (1 is also accepted).",
        )
        require(shift > 0, f"flow_shift={shift} must be positive (the official scripts use 5.0).")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.solver_order = int(solver_order)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        require(n >= 1, f"num_inference_steps={num_inference_steps} must be at least 1.")
        # float64 numpy, exactly as diffusers 0.35.2: σ_raw = 1 − linspace(1, 1/T, n+1), descending.
        raw = (1.0 - np.linspace(1, 1 / self.num_train_timesteps, n + 1))[::-1][:-1]
        sigmas = shift_sigmas(raw, self.shift)
        self.timesteps = torch.from_numpy((sigmas * self.num_train_timesteps).astype(np.int64))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))

        self._orders = [self._predictor_order(i, n) for i in range(n)]
        self._predictor = [
            _unipc_coefficients(self.sigmas, i + 1, i, self._orders[i], corrector=False) for i in range(n)
        ]
        # The corrector at step i refines the previous prediction with the order that predictor used.
        self._corrector = [None] + [
            _unipc_coefficients(self.sigmas, i, i - 1, self._orders[i - 1], corrector=True)
            for i in range(1, n)
        ]
        self._reset_history()

    def _predictor_order(self, index: int, n: int) -> int:
        order = min(self.solver_order, n - index)  # lower_order_final
        return min(order, index + 1)  # warm-up: one more history entry per step

    def _reset_history(self) -> None:
        self._step_index = 0
        self._x0_history: list[torch.Tensor] = []  # data predictions, newest last
        self._last_sample: Optional[torch.Tensor] = None

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check_can_step()
        i = self._step_index
        # x0 = x − σ·v; σ is a 0-dim CPU float32 tensor, so σ·v keeps v's dtype (bf16 for plain CFG).
        x0 = sample - self.sigmas[i] * velocity
        if i > 0:
            sample = self._correct(x0, sample, self._corrector[i])
        self._x0_history = (self._x0_history + [x0])[-self.solver_order:]
        self._last_sample = sample
        prev = self._predict(sample, self._predictor[i])
        self._step_index += 1
        return prev

    def _predict(self, sample: torch.Tensor, c: _UpdateCoefficients) -> torch.Tensor:
        m0 = self._x0_history[-1]
        out = c.ratio * sample - c.c_m0 * m0
        if c.order == 2:
            d1 = (self._x0_history[-2] - m0) / c.rk
            out = out - c.c_res * (d1 * 0.5)
        return out.to(sample.dtype)

    def _correct(self, x0_now: torch.Tensor, sample: torch.Tensor, c: _UpdateCoefficients) -> torch.Tensor:
        m0 = self._x0_history[-1]
        base = c.ratio * self._last_sample - c.c_m0 * m0
        residual = c.rho_now * (x0_now - m0)
        if c.order == 2:
            d1 = (self._x0_history[-2] - m0) / c.rk
            residual = c.rho_prev * d1 + residual
        return (base - c.c_res * residual).to(sample.dtype)


# --------------------------------------------------------------------------- #
# Euler (official FlowMatchScheduler fallback, --no-use_unipc)
# --------------------------------------------------------------------------- #
class FlowEulerScheduler(_StepCounter):
    """Euler flow sampler x' = x + (σ_next − σ)·v, as the official fallback makes it.

    The official schedule is built in **bfloat16**: σ = shift(linspace(1, 0, n)) and
    timesteps = 1000·σ, so the last σ is already 0 (that last step moves nothing)
    and neighbouring timesteps can coincide. Each step looks its σ up by the first
    timestep equal to the current one (the official ``argmin``), so a repeated
    timestep repeats the earlier move. ``timesteps`` and ``sigmas`` stay bfloat16;
    ``sigmas`` gets a final 0 appended for the common [n+1] interface.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        require(shift > 0, f"flow_shift={shift} must be positive (the official scripts use 5.0).")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        require(n >= 1, f"num_inference_steps={num_inference_steps} must be at least 1.")
        sigmas = shift_sigmas(torch.linspace(1.0, 0.0, n, dtype=torch.bfloat16), self.shift)
        self.timesteps = sigmas * self.num_train_timesteps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])

        deltas = []
        for i in range(n):
            j = int(torch.nonzero(self.timesteps == self.timesteps[i])[0])
            nxt = self.sigmas[j + 1] if j + 1 < n else 0
            # The bf16 difference, held as an exact float32 CPU scalar (same product as the official).
            deltas.append((nxt - self.sigmas[j]).to(torch.float32))
        self._deltas = deltas
        self._step_index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check_can_step()
        out = sample + velocity * self._deltas[self._step_index]
        self._step_index += 1
        return out


# --------------------------------------------------------------------------- #
# Distill (lightx2v step-distill schedule; not an official Bernini sampler)
# --------------------------------------------------------------------------- #
# lightx2v's `denoising_step_list` of its Wan2.2 A14B 4-step distill configs (configs/distill/wan22/*.json).
DISTILL_STEP_LIST = (1000, 750, 500, 250)


def distill_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The integer timesteps of an n-step distill schedule: T − ⌊T·k/n⌋ for k = 0..n−1.

    lightx2v publishes only the 4-step list (1000, 750, 500, 250), which this rule gives exactly; other counts
    take the same even spacing, which is also what ComfyUI's "simple" scheduler picks from its 1000-entry table
    (docs/fast_sampling.md §3)."""
    n = int(num_steps)
    require(n >= 1, f"num_inference_steps={num_steps} must be at least 1.")
    return [num_train_timesteps - (num_train_timesteps * k) // n for k in range(n)]


class FlowDistillScheduler(_StepCounter):
    """The step-distill sampler of lightx2v (``WanStepDistillScheduler`` / ``Wan22StepDistillScheduler``).

    Sigmas: σ_k = shift(1 − k/T) for k = 0..T−1 computed in float32 as lightx2v does (linspace, then the shift),
    read at index T − t for each integer timestep t; the DiT sees t' = 1000·σ. ``step`` works in float32:
    x0 = x − σ·v, then x0 + σ_next·v unless it is the last step (whose σ_next is 0: x0 itself).
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000, step_list=None):
        require(shift > 0, f"flow_shift={shift} must be positive (lightx2v's distill configs use 5.0).")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.step_list = None if step_list is None else [int(t) for t in step_list]

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        steps = self.step_list if self.step_list is not None else distill_timesteps(n, self.num_train_timesteps)
        if len(steps) != n or any(not 1 <= t <= self.num_train_timesteps for t in steps):
            raise BerniniError(f"the distill step list {steps} must hold {n} timesteps in 1..{self.num_train_timesteps}"
                               "; give as many timesteps as steps.")
        total = self.num_train_timesteps
        table = shift_sigmas(torch.linspace(1.0, 0.0, total + 1, dtype=torch.float32)[:-1], self.shift)
        picked = table[[total - t for t in steps]]
        self.timesteps = picked * total
        self.sigmas = torch.cat([picked, picked.new_zeros(1)])
        self._step_index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check_can_step()
        i = self._step_index
        flow = velocity.to(torch.float32)
        out = sample.to(torch.float32) - float(self.sigmas[i]) * flow
        if i < self.num_inference_steps - 1:
            out = out + flow * float(self.sigmas[i + 1])
        self._step_index += 1
        return out.to(sample.dtype)


def make_scheduler(use_unipc: bool, shift: float, sampler: Optional[str] = None):
    """The sampler named by `sampler` (one of tasks.SAMPLER_NAMES), or, when None, the official choice
    (``--use_unipc``, default on), with the given flow shift."""
    if sampler is None:
        sampler = "unipc" if use_unipc else "euler"
    if sampler not in SAMPLER_NAMES:
        raise BerniniError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLER_NAMES)}.")
    return {"unipc": FlowUniPCScheduler, "euler": FlowEulerScheduler, "distill": FlowDistillScheduler}[sampler](
        shift=shift)


# The UniPC configuration this module implements (the stock Wan2.2 -Diffusers scheduler_config.json, what the
# official code loads and only overrides flow_shift of, docs/official_behaviour.md §4.6). A release whose file differs
# would be sampled differently by the official code, so loaders check it.
STOCK_UNIPC_CONFIG = {
    "solver_order": 2,
    "solver_type": "bh2",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "num_train_timesteps": 1000,
    "thresholding": False,
    "disable_corrector": [],
}


def unsupported_scheduler_fields(config: dict) -> list[str]:
    """`field: found (supported: value)` for every field of a scheduler_config.json that the flow UniPC here does
    not implement; empty for the stock Wan2.2 file. Fields the file leaves out take diffusers' defaults, which
    are the stock values except for the flow settings, so only fields present are compared."""
    return [f"{key}: {config[key]!r} (supported: {value!r})" for key, value in STOCK_UNIPC_CONFIG.items()
            if key in config and config[key] != value]

