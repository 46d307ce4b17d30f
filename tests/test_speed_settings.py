"""Speed settings wired through the CLI, `from_pretrained` and the loader node: compile and block swap change how the
experts run, never what they compute; bad values are refused before anything loads."""

import pytest
import torch

from bernini_core import BerniniPipeline
from bernini_core.acceleration import settings as speed
from bernini_core.acceleration.settings import SpeedSettings
from bernini_core.cli import main
from bernini_core.errors import BerniniError

SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=3, seed=3)


def _latent(pipe):
    return pipe.sample(pipe.encode_prompt("t2v", "a red fox"), pipe.prepare_sources("t2v"),
                       pipe.resolve("t2v", dict(SMALL)))


@pytest.fixture(scope="module")
def eager_latent(tiny_renderer_dir):
    return _latent(BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32"))


def test_block_swap_through_from_pretrained_equals_the_plain_run(tiny_renderer_dir, eager_latent):
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32",
                                           speed=SpeedSettings(block_swap=2))
    for handle in (pipe.experts.high, pipe.experts.low):
        swap = handle.module.block_swap
        assert swap.swapped == (len(handle.module.blocks) - 2, len(handle.module.blocks) - 1)
    latent = _latent(pipe)
    assert torch.equal(latent, eager_latent)
    # the schedule ran on the last forward: the swapped blocks were staged, run and released
    layers = len(pipe.experts.low.module.blocks)
    events = pipe.experts.low.module.block_swap.schedule
    assert ("prefetch", layers - 2) in events and ("release", layers - 1) in events


def test_compile_through_from_pretrained_equals_eager(tiny_renderer_dir, eager_latent):
    torch._dynamo.reset()
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32",
                                           speed=SpeedSettings(compile=True, compile_backend="aot_eager"))
    for handle in (pipe.experts.high, pipe.experts.low):
        assert handle.module.compiled_blocks.backend == "aot_eager"
        assert all(block._compiled_call_impl is not None for block in handle.module.blocks)
    latent = _latent(pipe)
    torch._dynamo.reset()
    assert torch.allclose(latent, eager_latent, atol=1e-5, rtol=0)


def test_runtime_moves_only_the_resident_part_of_a_swapped_expert(tiny_renderer_dir, monkeypatch):
    from bernini_core.runtime import ModelHandle

    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32",
                                           speed=SpeedSettings(block_swap=1))
    dit = pipe.experts.high.module
    swap = dit.block_swap
    monkeypatch.setattr(dit, "to", lambda *a, **k: pytest.fail("module.to would pull the swapped blocks along"))
    moved = []
    original = swap.move_resident
    monkeypatch.setattr(swap, "move_resident", lambda device: (moved.append(str(device)), original(device))[1])
    # "cpu:0" != "cpu": a second device name on a CPU-only machine, so that offload moves too
    handle = ModelHandle("high", dit, torch.device("cpu"), torch.device("cpu", 0))
    handle.load()
    handle.offload()
    assert moved == ["cpu", "cpu:0"]
    assert torch.equal(_latent(pipe), _latent(BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu",
                                                                              dtype="fp32")))


@pytest.mark.parametrize("values, fragment", [
    (dict(block_swap=-1), r"from 0 \(off\) to 40"),
    (dict(block_swap=41), r"from 0 \(off\) to 40"),
    (dict(block_swap=True), r"from 0 \(off\) to 40"),
    (dict(compile="yes"), "compile must be true or false"),
    (dict(compile_mode="turbo"), "compile mode 'turbo' is unknown"),
])
def test_bad_settings_are_refused_before_the_load(tiny_renderer_dir, monkeypatch, values, fragment):
    import bernini_core.loaders as loaders

    monkeypatch.setattr(loaders, "load_renderer", lambda *a, **k: pytest.fail("the load started"))
    with pytest.raises(BerniniError, match=fragment):
        BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", speed=SpeedSettings(**values))


def test_block_swap_beyond_the_experts_depth_names_the_depth(tiny_renderer_dir):
    from bernini_core.tiny import TINY_DIT

    layers = TINY_DIT["num_layers"]
    with pytest.raises(BerniniError, match=f"this expert has only {layers} blocks"):
        BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32",
                                        speed=SpeedSettings(block_swap=layers + 1))


def test_cli_flags(tiny_renderer_dir, tmp_path, capsys, monkeypatch):
    seen = []
    original = speed.SpeedSettings.apply

    def spy(self, experts, device, *, offload):
        seen.append(self)
        return original(self, experts, device, offload=offload)

    monkeypatch.setattr(speed.SpeedSettings, "apply", spy)
    out = tmp_path / "swap.mp4"
    code = main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
                 "--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "2",
                 "--device", "cpu", "--block_swap", "1", "--output", str(out)])
    assert code == 0 and out.is_file()
    assert seen == [SpeedSettings(block_swap=1)]


@pytest.mark.parametrize("extra, fragment", [
    (["--block_swap", "-2"], "block_swap -2"),
    (["--block_swap", "2", "--gpus", "2"], "block_swap runs one process"),
    (["--compile_mode", "fast"], "invalid choice"),
])
def test_cli_refuses_bad_speed_flags(tiny_renderer_dir, capsys, extra, fragment):
    with pytest.raises(SystemExit) if fragment == "invalid choice" else _no_raise():
        code = main(["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2v", "--prompt", "a fox",
                     "--device", "cpu", *extra])
        assert code == 2
    assert fragment in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_loader_node_compile_switch(comfy, tiny_renderer_dir, monkeypatch):
    import shutil

    from bernini_core import node_models

    shutil.copytree(tiny_renderer_dir, comfy.models / "bernini" / "Bernini-R-Diffusers")
    monkeypatch.setattr(speed, "DEFAULT_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    renderer, _, _ = node_models.load_renderer("Bernini-R-Diffusers", "fp32", "sdpa", "never", compile=True)
    experts = renderer.pipeline.components
    assert experts.dit_high.compiled_blocks.backend == "aot_eager"
    plain, _, _ = node_models.load_renderer("Bernini-R-Diffusers", "fp32", "sdpa", "never")
    assert getattr(plain.pipeline.components.dit_high, "compiled_blocks", None) is None
    with pytest.raises(BerniniError, match="compile must be true or false"):
        node_models.load_renderer("Bernini-R-Diffusers", "fp32", "sdpa", "never", compile="on")
    torch._dynamo.reset()
