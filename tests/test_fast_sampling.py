"""Fast sampling for step-distilled experts (docs/fast_sampling.md): the lightx2v distill schedule and update, guidance
"none", the "fast" preset through the API, the CLI and the node, and the official presets left as they were.

Expected values are written out by hand from lightx2v's published configs (docs/fast_sampling.md §2): timesteps
1000/750/500/250, shift 5 → σ = 1, 15/16, 5/6, 5/8; the step update x0 = x − σ·v, re-noised with σ_next·v.
"""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini_core import BerniniError, node_api
from bernini_core.node_models import RENDERER_FAMILY, RendererModel, TextEncoderModel, VAEModel
from bernini_core.sampling.guidance import VI_POS, Omegas, RendererGuidance
from bernini_core.sampling.guidance_full import FULL, FullGuidance
from bernini_core.sampling.schedulers import (DISTILL_STEP_LIST, FlowDistillScheduler, FlowEulerScheduler,
                                              FlowUniPCScheduler, distill_timesteps, expert_split, make_scheduler)
from bernini_core.tasks import FAST_OVERRIDES, TASK_NAMES, renderer_preset, resolve_settings

SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48)
PROMPT = "a red fox"


# ------------------------------------------------------------------ the schedule and the update
def test_the_schedule_is_lightx2vs_published_one():
    assert DISTILL_STEP_LIST == (1000, 750, 500, 250)
    assert distill_timesteps(4) == [1000, 750, 500, 250]
    assert FAST_OVERRIDES == {"guidance_mode": "none", "num_inference_steps": 4, "sampler": "distill",
                              "flow_shift": 5.0, "boundary_step_index": 2}
    scheduler = FlowDistillScheduler(shift=5.0)
    scheduler.set_timesteps(4)
    # shift 5: 5σ/(1+4σ) at σ = 1, 0.75, 0.5, 0.25
    assert torch.allclose(scheduler.sigmas.double(), torch.tensor([1.0, 15 / 16, 5 / 6, 5 / 8, 0.0],
                                                                   dtype=torch.float64), atol=1e-6)
    assert torch.allclose(scheduler.timesteps.double(), torch.tensor([1000.0, 937.5, 2500 / 3, 625.0],
                                                                      dtype=torch.float64), atol=1e-3)
    # lightx2v switches experts at step index 2; the official timestep rule (t >= 875) gives the same split here
    assert expert_split(scheduler.timesteps, 0.875) == 2
    # other step counts: the same even spacing (ComfyUI's "simple" scheduler)
    assert distill_timesteps(1) == [1000] and distill_timesteps(3) == [1000, 667, 334]
    assert distill_timesteps(8) == [1000, 875, 750, 625, 500, 375, 250, 125]
    explicit = FlowDistillScheduler(shift=5.0, step_list=[1000, 500])
    explicit.set_timesteps(2)
    assert torch.allclose(explicit.sigmas.double(), torch.tensor([1.0, 5 / 6, 0.0], dtype=torch.float64), atol=1e-6)
    with pytest.raises(BerniniError, match="2 timesteps"):
        FlowDistillScheduler(step_list=[1000, 500, 250]).set_timesteps(2)


def test_the_distill_step_equals_a_hand_computation():
    scheduler = FlowDistillScheduler(shift=5.0)
    scheduler.set_timesteps(2)  # timesteps 1000, 500 → σ = 1, 5/6
    x = torch.tensor([1.0, -2.0, 0.5])
    v1, v2 = torch.tensor([0.5, 0.25, -1.0]), torch.tensor([-0.75, 2.0, 0.125])
    x = scheduler.step(v1, x)
    # step 1: x0 = x − 1·v, re-noised to 5/6: x0 + (5/6)·v
    expected = [1.0 - 0.5 + 5 / 6 * 0.5, -2.0 - 0.25 + 5 / 6 * 0.25, 0.5 + 1.0 - 5 / 6]
    assert torch.allclose(x.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    x = scheduler.step(v2, x)
    # last step: x0 = x − (5/6)·v, no re-noising
    expected = [e - 5 / 6 * v for e, v in zip(expected, (-0.75, 2.0, 0.125))]
    assert torch.allclose(x.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    with pytest.raises(RuntimeError, match="already taken"):
        scheduler.step(v2, x)


@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("sampler", ["unipc", "euler", "distill"])
def test_every_sampler_runs_down_to_one_step(sampler, steps):
    """On an exactly straight flow (x_t = (1−σ)·x0 + σ·ε, v = ε − x0) every sampler must land on x0 whatever the
    step count (UniPC starts just below σ = 1, so the sample starts on the line at its first σ)."""
    generator = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    scheduler = make_scheduler(True, 5.0, sampler)
    assert type(scheduler) is {"unipc": FlowUniPCScheduler, "euler": FlowEulerScheduler,
                               "distill": FlowDistillScheduler}[sampler]
    scheduler.set_timesteps(steps)
    assert scheduler.num_inference_steps == steps
    sigma = float(scheduler.sigmas[0])
    sample = (1 - sigma) * x0 + sigma * noise
    for _ in range(steps):
        sample = scheduler.step(noise - x0, sample)
    assert torch.allclose(sample, x0, atol=1e-4)
    assert make_scheduler(False, 5.0, None).__class__ is FlowEulerScheduler  # None: the official choice
    with pytest.raises(BerniniError, match="sampler 'lcm'"):
        make_scheduler(True, 5.0, "lcm")


# ------------------------------------------------------------------ guidance "none"
def test_guidance_none_is_the_full_condition_arm_unchanged():
    shape = (1, 2, 1, 2, 2)
    arm_output = torch.randn(shape)
    for omegas in (Omegas(1.25, 4.5, 4.0), Omegas(0.0, 0.0, 0.0, 0.0), Omegas(9.0, -3.0, 2.0, 7.0)):
        renderer = RendererGuidance("none")
        assert renderer.arms(omegas) == [VI_POS] and not renderer.uses_apg
        assert renderer.combine({VI_POS: arm_output}, omegas, sample=torch.zeros(shape), sigma=0.5) is arm_output
        full = FullGuidance("none")
        assert full.arms(omegas) == [FULL] and str(FULL) == "wvae/wtxt_wvit" and not full.uses_apg
        assert full.combine({FULL: arm_output}, omegas) is arm_output
    with pytest.raises(KeyError):
        RendererGuidance("none").combine({}, Omegas(1.0, 1.0, 1.0), sample=torch.zeros(shape), sigma=0.5)


class ForwardLog:
    """Every DiT forward of both experts: (expert, number of streams incl. the target, timestep)."""

    def __init__(self, experts):
        self.calls, self.hooks = [], []
        for name, handle in (("high", experts.high), ("low", experts.low)):
            self.hooks.append(handle.module.register_forward_pre_hook(
                lambda module, args, _name=name: self.calls.append((_name, len(args[0]), float(args[2][0])))))

    def close(self):
        for hook in self.hooks:
            hook.remove()


@pytest.fixture
def forwards(fp32_renderer):
    log = ForwardLog(fp32_renderer.experts)
    yield log.calls
    log.close()


def _task_files(task, media_dir):
    d = media_dir
    return {"t2i": {}, "t2v": {}, "i2i": {"image": str(d / "ref0.png")},
            "v2v": {"video": str(d / "source.mp4")}, "mv2v": {"video": str(d / "source.mp4")},
            "ads2v": {"video": [str(d / "source.mp4"), str(d / "reference.mp4")]},
            "r2v": {"images": [str(d / "ref0.png"), str(d / "ref1.png")]},
            "rv2v": {"video": str(d / "source.mp4"), "images": [str(d / "ref0.png")]}}[task]


SOURCE_COUNT = {"t2i": 0, "t2v": 0, "i2i": 1, "v2v": 1, "mv2v": 1, "ads2v": 2, "r2v": 2, "rv2v": 2}
FAST_TIMESTEPS = [1000.0, 937.5, 2500 / 3, 625.0]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_fast_preset_runs_every_bernini_r_task_with_one_pass_per_step(fp32_renderer, forwards, media_dir, task):
    out = fp32_renderer(task, PROMPT, preset="fast", **SMALL, **_task_files(task, media_dir))
    assert bool(torch.isfinite(out.frames).all())
    assert {k: out.settings[k] for k in FAST_OVERRIDES} == FAST_OVERRIDES
    # one forward per step, each with every source beside the target; high, high, low, low on lightx2v's timesteps
    assert [c[0] for c in forwards] == ["high", "high", "low", "low"]
    assert all(c[1] == SOURCE_COUNT[task] + 1 for c in forwards)
    assert np.allclose([c[2] for c in forwards], FAST_TIMESTEPS, atol=1e-3)


def test_guidance_none_uses_the_positive_text_only(fp32_renderer, forwards):
    """The negative prompt feeds no arm under "none" (it does under the official mode: the test can fail)."""
    def latents(mode, negative):
        return fp32_renderer("t2v", PROMPT, guidance_mode=mode, neg_prompt=negative, num_inference_steps=2,
                             **SMALL).latents
    assert torch.equal(latents("none", "blurry"), latents("none", "dark, noisy"))
    assert len(forwards) == 4  # 2 runs × 2 steps × 1 pass
    assert not torch.equal(latents("t2v_apg", "blurry"), latents("t2v_apg", "dark, noisy"))


def test_explicit_settings_beat_the_preset(fp32_renderer, forwards, caplog):
    base = renderer_preset("v2v")
    settings = resolve_settings(base, {"preset": "fast", "num_inference_steps": 8})
    assert [settings[k] for k in ("num_inference_steps", "boundary_step_index", "guidance_mode")] == [8, 4, "none"]
    assert resolve_settings(base, {"preset": "fast", "num_inference_steps": 3})["boundary_step_index"] == 2
    assert resolve_settings(base, {"preset": "fast", "num_inference_steps": 1})["boundary_step_index"] == 1
    chosen = resolve_settings(base, {"preset": "fast", "num_inference_steps": 8, "boundary_step_index": 1,
                                     "guidance_mode": "v2v_apg", "sampler": "unipc", "flow_shift": 3.0})
    assert (chosen["boundary_step_index"], chosen["guidance_mode"], chosen["sampler"], chosen["flow_shift"]) == (
        1, "v2v_apg", "unipc", 3.0)
    for bad, fragment in (({"preset": "turbo"}, "preset 'turbo'"), ({"sampler": "lcm"}, "sampler 'lcm'"),
                          ({"boundary_step_index": -1}, "boundary_step_index")):
        with pytest.raises(BerniniError, match=fragment):
            resolve_settings(base, bad)
    # through the pipeline: the distill sampler with guidance on; the ignored weights are named once each
    with caplog.at_level(logging.WARNING, logger="bernini.pipeline"):
        fp32_renderer("t2v", PROMPT, preset="fast", num_inference_steps=2, omega_txt=3.0, **SMALL)
    assert sum("omega_txt is ignored" in r.getMessage() for r in caplog.records) == 1
    forwards.clear()
    fp32_renderer("t2v", PROMPT, preset="fast", guidance_mode="t2v", num_inference_steps=3, **SMALL)
    assert len(forwards) == 6 and [c[0] for c in forwards[::2]] == ["high", "high", "low"]
    # timesteps 1000, 667, 334 → σ = 5σ'/(1+4σ') at σ' = 1, 0.667, 0.334
    assert np.allclose([c[2] for c in forwards[::2]], [1000.0, 1000 * 5 * 0.667 / (1 + 4 * 0.667),
                                                       1000 * 5 * 0.334 / (1 + 4 * 0.334)], atol=1e-2)


def test_official_preset_is_unchanged(fp32_renderer):
    for task in TASK_NAMES:
        assert resolve_settings(renderer_preset(task), {}) == renderer_preset(task)  # no new keys by default
        assert "sampler" not in renderer_preset(task) and "boundary_step_index" not in renderer_preset(task)
    default = fp32_renderer("t2v", PROMPT, num_inference_steps=2, **SMALL)
    named = fp32_renderer("t2v", PROMPT, num_inference_steps=2, preset="official", **SMALL)
    assert torch.equal(default.latents, named.latents)
    unipc = fp32_renderer("t2v", PROMPT, num_inference_steps=2, sampler="unipc", **SMALL)
    assert torch.equal(default.latents, unipc.latents)  # the official sampler is UniPC


# ------------------------------------------------------------------ CLI and node
def test_cli_preset_fast(fp32_renderer, tiny_renderer_dir, forwards, tmp_path, monkeypatch, capsys):
    from bernini_core import cli
    from bernini_core.pipeline import BerniniPipeline

    def loaded(cls, path, **kwargs):
        return fp32_renderer

    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(loaded))  # the loaded tiny renderer
    argv = ["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", PROMPT,
            "--num_frames", "5", "--height", "32", "--width", "32", "--quiet", "--output", str(tmp_path / "fast.mp4")]
    assert cli.main(argv + ["--preset", "fast"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert [c[0] for c in forwards] == ["high", "high", "low", "low"]
    assert np.allclose([c[2] for c in forwards], FAST_TIMESTEPS, atol=1e-3)
    forwards.clear()
    assert cli.main(argv + ["--guidance_mode", "none", "--sampler", "distill", "--num_inference_steps", "2",
                            "--boundary_step_index", "0", "--overwrite"]) == 0
    assert [c[0] for c in forwards] == ["low", "low"] and np.allclose([c[2] for c in forwards], [1000.0, 2500 / 3])
    for flag, value in (("--preset", "turbo"), ("--sampler", "lcm")):
        with pytest.raises(SystemExit):
            cli.main(argv + [flag, value])
        assert "invalid choice" in capsys.readouterr().err


def _node_inputs(pipe, task, media_dir):
    models = [cls(pipe, RENDERER_FAMILY, "R") for cls in (RendererModel, TextEncoderModel, VAEModel)]
    renderer, text_encoder, vae = models
    cond = node_api.encode_prompt(text_encoder, task, PROMPT)
    video = None
    if task == "v2v":
        from bernini_core.media import read_video

        frames, _ = read_video(media_dir / "source.mp4")
        video = torch.from_numpy(np.array(frames)).float() / 255.0
    sources = node_api.prepare_sources(cond, vae, 32, 32, 5, 16, 48, source_video=video)
    return renderer, cond, sources


def test_node_preset_fast_and_the_expert_boundary_override(fp32_renderer, forwards, media_dir):
    renderer, cond, sources = _node_inputs(fp32_renderer, "v2v", media_dir)
    widgets = ("auto", 0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0, 42)
    latent = node_api.sample(renderer, cond, sources, *widgets, -1.0, preset="fast")
    assert bool(torch.isfinite(latent["samples"]).all())
    assert [c[0] for c in forwards] == ["high", "high", "low", "low"] and all(c[1] == 2 for c in forwards)
    forwards.clear()
    # expert_boundary 0.95: the timestep rule instead of the step index (only t = 1000 is ≥ 950)
    node_api.sample(renderer, cond, sources, *widgets, 0.95, preset="fast")
    assert [c[0] for c in forwards] == ["high", "low", "low", "low"]
    forwards.clear()
    # widgets off their sentinel beat the preset: 6 steps of guided v2v under the distill sampler
    node_api.sample(renderer, cond, sources, "v2v", 6, *widgets[2:], -1.0, preset="fast")
    assert len(forwards) == 12 and [c[0] for c in forwards[::2]] == ["high"] * 3 + ["low"] * 3
    forwards.clear()
    node_api.sample(renderer, cond, sources, "none", 2, *widgets[2:], -1.0, sampler="distill")
    assert [c[2] for c in forwards] == [1000.0, pytest.approx(2500 / 3, abs=1e-3)]
    assert "none" in node_api.GUIDANCE_CHOICES and node_api.PRESET_CHOICES == ("official", "fast")


# ------------------------------------------------------------------ full Bernini
def test_full_bernini_fast_preset_end_to_end(tiny_bernini_v1_dir):
    from bernini_core import BerniniPipeline

    pipe = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32")
    log = ForwardLog(pipe.experts)
    try:
        out = pipe("t2v", PROMPT, preset="fast", planning_step=2, vit_denoising_step=1, **SMALL)
    finally:
        log.close()
    assert bool(torch.isfinite(out.frames).all()) and out.settings["guidance_mode"] == "none"
    assert [c[0] for c in log.calls] == ["high", "high", "low", "low"]
    assert np.allclose([c[2] for c in log.calls], FAST_TIMESTEPS, atol=1e-3)
