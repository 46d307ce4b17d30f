"""Schedulers vs diffusers' UniPC (flow config), the documented numbers and a hand-written Euler.

docs/official_behaviour.md §4.5, §4.6, §7.3; docs/wan_qwen.md §1.6.
"""

import numpy as np
import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.sampling.schedulers import (
    FlowEulerScheduler,
    FlowUniPCScheduler,
    expert_split,
    make_scheduler,
)

LATENT_SHAPE = (1, 16, 3, 4, 6)


def diffusers_flow_unipc(n: int, shift: float):
    """diffusers UniPC configured as the official renderer loads it, fed the flow sigmas
    diffusers 0.35.2 (the official pin) builds itself: 1 − linspace(1, 1/1000, n+1),
    descending, last dropped. (Later diffusers, e.g. 0.42, build them differently, so pass them.)"""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    raw = (1.0 - np.linspace(1, 1 / 1000, n + 1))[::-1][:-1].copy()
    sched.set_timesteps(sigmas=raw)
    return sched


CASES = [(1, 5.0), (2, 5.0), (3, 5.0), (4, 5.0), (10, 3.0), (40, 5.0), (50, 5.0), (17, 12.0)]


@pytest.mark.parametrize("n,shift", CASES)
def test_unipc_schedule_matches_diffusers_and_formula(n, shift):
    ours = FlowUniPCScheduler(shift=shift)
    ours.set_timesteps(n)
    ref = diffusers_flow_unipc(n, shift)
    assert ours.timesteps.dtype == torch.int64 and ours.timesteps.shape == (n,)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (n + 1,)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    # docs/official_behaviour.md §4.6, transcribed: raw = linspace(0.999, 0, n+1)[:-1]; σ = s·r/(1+(s−1)·r); final 0.
    raw = np.linspace(0.999, 0, n + 1)[:-1]
    sigma = shift * raw / (1 + (shift - 1) * raw)
    # float64 σ ≤ 1 rounded once to float32: within 2^-25 ≈ 3.0e-8 on any machine (measured ≤ 2.96e-8)
    np.testing.assert_allclose(ours.sigmas[:-1].numpy(), sigma, rtol=0, atol=1e-7)
    assert ours.sigmas[-1] == 0
    assert ours.timesteps.tolist() == [int(1000 * s) for s in sigma]


@pytest.mark.parametrize("n,shift", [(3, 5.0), (6, 5.0), (12, 3.0), (40, 5.0)])
@pytest.mark.parametrize("velocity_dtype", [torch.float32, torch.bfloat16])
def test_unipc_trajectory_matches_diffusers(n, shift, velocity_dtype):
    ours = FlowUniPCScheduler(shift=shift)
    ours.set_timesteps(n)
    ref = diffusers_flow_unipc(n, shift)
    gen = torch.Generator().manual_seed(n)
    x_ref = torch.randn(LATENT_SHAPE, generator=gen)
    x_ours = x_ref.clone()
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        assert ours.step_index == i
        assert ours.current_sigma == float(ref.sigmas[i])
        v = torch.randn(LATENT_SHAPE, generator=gen).to(velocity_dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, x_ours)
        assert x_ours.dtype == torch.float32
        worst = max(worst, ((x_ours - x_ref).abs().max() / x_ref.abs().max()).item())
    assert worst <= 1e-6, worst
    assert ours.step_index == n
    with pytest.raises(RuntimeError):
        ours.step(v, x_ours)


def test_unipc_set_timesteps_resets_history():
    sched = FlowUniPCScheduler(shift=5.0)
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(LATENT_SHAPE, generator=gen)
    velocities = [torch.randn(LATENT_SHAPE, generator=gen) for _ in range(4)]

    def run():
        x = x0
        for v in velocities:
            x = sched.step(v, x)
        return x

    first = run()
    sched.set_timesteps(4)
    assert torch.equal(run(), first)


def test_spec_example_timesteps():
    # docs/official_behaviour.md §7.3: shift 5, 3 steps → 999, 908, 713; 4 steps → 999, 937, 833, 624.
    sched = FlowUniPCScheduler(shift=5.0)
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 908, 713]
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 937, 833, 624]


@pytest.mark.parametrize("shift,n,high", [(5.0, 40, 17), (5.0, 50, 21), (3.0, 40, 12), (3.0, 50, 15)])
def test_expert_split_spec(shift, n, high):
    sched = FlowUniPCScheduler(shift=shift)
    sched.set_timesteps(n)
    assert expert_split(sched.timesteps) == high
    ts = sched.timesteps.tolist()
    assert all(t >= 875 for t in ts[:high]) and all(t < 875 for t in ts[high:])


def test_expert_split_boundary():
    assert expert_split(torch.tensor([999, 875, 874, 10])) == 2
    assert expert_split([900.0, 880.0, 860.0], boundary=0.87) == 2
    assert expert_split(torch.tensor([999, 500]), boundary=0.0) == 2  # 1.3B: single expert


# --------------------------------------------------------------------------- #
# Euler: hand transcription of the official FlowMatchScheduler(sigma_min=0)
# --------------------------------------------------------------------------- #
def official_euler_schedule(n, shift):
    """bf16: σ = linspace(1, 0, n); σ ← s·σ/(1+(s−1)·σ); t = 1000·σ."""
    s = torch.linspace(1.0, 0.0, n, dtype=torch.bfloat16)
    s = shift * s / (1 + (shift - 1) * s)
    return s, s * 1000


def official_euler_step(sigmas, timesteps, t, sample, v):
    """x + (σ_next − σ)·v, with σ found by nearest timestep and σ_next = 0 after the last."""
    idx = int(torch.argmin((timesteps - t).abs()))
    sigma = sigmas[idx]
    sigma_next = sigmas[idx + 1] if idx + 1 < len(timesteps) else 0
    return sample + v * (sigma_next - sigma)


@pytest.mark.parametrize("n,shift", [(4, 5.0), (10, 3.0), (40, 5.0)])
@pytest.mark.parametrize("velocity_dtype", [torch.float32, torch.bfloat16])
def test_euler_matches_hand_transcription(n, shift, velocity_dtype):
    sched = make_scheduler(use_unipc=False, shift=shift)
    assert isinstance(sched, FlowEulerScheduler)
    sched.set_timesteps(n)
    sigmas, timesteps = official_euler_schedule(n, shift)
    assert sched.timesteps.dtype == torch.bfloat16
    assert torch.equal(sched.timesteps, timesteps)
    assert torch.equal(sched.sigmas[:-1], sigmas) and sched.sigmas[-1] == 0
    gen = torch.Generator().manual_seed(n)
    x_ref = torch.randn(LATENT_SHAPE, generator=gen)
    x_ours = x_ref.clone()
    for i, t in enumerate(timesteps):
        assert sched.current_sigma == float(sigmas[i])
        v = torch.randn(LATENT_SHAPE, generator=gen).to(velocity_dtype)
        x_ref = official_euler_step(sigmas, timesteps, t, x_ref, v)
        x_ours = sched.step(v, x_ours)
        assert x_ours.dtype == torch.float32
        assert torch.equal(x_ours, x_ref)


def test_euler_plain_step_formula():
    # No repeated timesteps at shift 3 / 10 steps: every step is x + (σ_{i+1} − σ_i)·v.
    sched = FlowEulerScheduler(shift=3.0)
    sched.set_timesteps(10)
    assert len(set(sched.timesteps.tolist())) == 10
    x = torch.randn(LATENT_SHAPE)
    for i in range(10):
        v = torch.randn(LATENT_SHAPE)
        expected = x + (float(sched.sigmas[i + 1]) - float(sched.sigmas[i])) * v
        x = sched.step(v, x)
        assert torch.equal(x, expected)  # the same float32 multiply and add (elementwise: exact on any CPU)


def test_make_scheduler_and_errors():
    sched = make_scheduler(use_unipc=True, shift=5.0)
    assert isinstance(sched, FlowUniPCScheduler) and sched.shift == 5.0
    with pytest.raises(BerniniError, match="solver_order"):
        FlowUniPCScheduler(solver_order=3)
    with pytest.raises(BerniniError, match="num_inference_steps"):
        FlowUniPCScheduler().set_timesteps(0)
    with pytest.raises(BerniniError, match="flow_shift"):
        FlowEulerScheduler(shift=0)


def test_scheduler_config_check_accepts_the_stock_file_and_names_what_differs(tmp_path, caplog):
    import json
    import logging

    from bernini_core.loaders import load_renderer
    from bernini_core.sampling.schedulers import unsupported_scheduler_fields
    from bernini_core.tiny import TINY_SCHEDULER, make_tiny_renderer

    assert unsupported_scheduler_fields(TINY_SCHEDULER) == []
    odd = dict(TINY_SCHEDULER, solver_order=3, prediction_type="epsilon")
    assert unsupported_scheduler_fields(odd) == ["solver_order: 3 (supported: 2)",
                                                 "prediction_type: 'epsilon' (supported: 'flow_prediction')"]
    root = make_tiny_renderer(tmp_path / "r")
    with caplog.at_level(logging.WARNING, logger="bernini.loaders"):
        load_renderer(root, dtype=torch.float32)
    assert "stock Wan2.2 UniPC" not in caplog.text
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(odd))
    with caplog.at_level(logging.WARNING, logger="bernini.loaders"):
        load_renderer(root, dtype=torch.float32)
    assert "stock Wan2.2 UniPC" in caplog.text and "solver_order: 3" in caplog.text
