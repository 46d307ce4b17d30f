"""comfy_bridge against a ComfyUI stand-in (tests/comfy_stub.py): ModelPatchers and load_models_gpu, progress
bars with Latent2RGB previews, interrupts mid-run, comfy.ops layers, model folders; and the plain-Python
fallbacks when ComfyUI is absent.

The stand-in lives in sys.modules only inside the `comfy` fixture: other tests assert ComfyUI is absent."""

import sys

import numpy as np
import pytest
import torch

from bernini_core import comfy_bridge
from bernini_core.errors import BerniniError
from bernini_core.runtime import Runtime


RENDER = dict(num_frames=5, height=32, width=48, max_image_size=48, num_inference_steps=3, seed=11)
FULL = dict(num_frames=1, height=32, width=32, max_image_size=48, num_inference_steps=2, planning_step=2,
            vit_denoising_step=1, seed=5)


def expected_preview(latent, wan21):
    """ComfyUI's Latent2RGB transcribed: RGB = factorsᵀ·z + bias on the last latent frame, -1..1 → 0..255."""
    frame = latent[0, :, -1].double()
    factors = torch.tensor(wan21.latent_rgb_factors, dtype=torch.float64)  # [16, 3]
    bias = torch.tensor(wan21.latent_rgb_factors_bias, dtype=torch.float64)
    rgb = torch.einsum("chw,cr->hwr", frame, factors) + bias
    return (((rgb + 1) / 2).clamp(0, 1) * 255).floor().to(torch.uint8).numpy()


def param_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def sample_updates(rec, stage_total):
    return [[(v, t) for v, t, _ in bar.updates] for bar in rec.bars if bar.total == stage_total]


# ---------------------------------------------------------------------------------------------- no ComfyUI
def test_outside_comfyui_everything_falls_back():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    assert not comfy_bridge.comfy_available()
    rt = comfy_bridge.runtime("cpu", offload=False)
    assert type(rt) is Runtime and rt.device == torch.device("cpu")
    for kind in ("bernini", "diffusion_models", "text_encoders", "vae"):
        assert comfy_bridge.list_models(kind) == []
    assert comfy_bridge.comfy_ops() is None
    assert comfy_bridge.intermediate_device() == torch.device("cpu")
    comfy_bridge.download_progress(3)(1)
    comfy_bridge.register_model_folders()
    with pytest.raises(BerniniError, match="only inside ComfyUI"):
        comfy_bridge.model_path("vae", "wan_2.1_vae.safetensors")
    with pytest.raises(BerniniError, match="unknown model kind"):
        comfy_bridge.list_models("checkpoints")
    assert "comfy" not in sys.modules  # looking never imports ComfyUI


# ---------------------------------------------------------------------------------------------- handles
def test_handles_are_core_model_patchers_with_devices_by_model_kind(comfy):
    gpu, te_gpu, cpu, te_off, vae_gpu, vae_off = (torch.device("cuda", 0), torch.device("cuda", 1),
                                                  torch.device("cpu"), torch.device("meta"),
                                                  torch.device("cuda", 2), torch.device("cuda", 3))
    comfy.rec.devices.update(get_torch_device=gpu, unet_offload_device=cpu, text_encoder_device=te_gpu,
                             text_encoder_offload_device=te_off, vae_device=vae_gpu, vae_offload_device=vae_off)
    rt = comfy_bridge.ComfyRuntime()
    assert rt.device == gpu
    expected = {"dit_high": (gpu, cpu), "dit_low": (gpu, cpu), "planner": (gpu, cpu), "umt5": (te_gpu, te_off),
                "vae": (vae_gpu, vae_off)}
    patcher_class = comfy.modules["comfy.model_patcher"].CoreModelPatcher
    for name, (load, offload) in expected.items():
        module = torch.nn.Linear(8, 4)
        handle = rt.handle(name, module)
        assert type(handle.patcher).__bases__ == (patcher_class,) and handle.module is module
        assert handle.patcher.model.inner is module  # wrapped: ComfyUI writes `device` on the model it patches
        assert (handle.load_device, handle.offload_device) == (load, offload)
        assert (handle.patcher.load_device, handle.patcher.offload_device) == (load, offload)
        assert handle.patcher.size == param_bytes(module) == handle.size_bytes == 8 * 4 * 4 + 4 * 4
        assert rt.handle(name, module) is handle  # one patcher per module, however often it is wrapped
    assert len(comfy.rec.patchers) == len(expected) and not comfy.rec.loads  # wrapping loads nothing

    # an explicit device pins every model; without CoreModelPatcher the plain ModelPatcher is used
    del comfy.modules["comfy.model_patcher"].CoreModelPatcher
    pinned = comfy_bridge.ComfyRuntime("cpu")
    handle = pinned.handle("umt5", torch.nn.Linear(2, 2))
    assert type(handle.patcher).__bases__ == (comfy.modules["comfy.model_patcher"].ModelPatcher,)
    assert (pinned.device, handle.load_device, handle.offload_device) == (cpu, cpu, te_off)
    assert type(comfy_bridge.runtime()) is comfy_bridge.ComfyRuntime
    assert comfy_bridge.intermediate_device() == cpu


def test_comfyui_log_names_each_model_by_its_role(comfy):
    """ComfyUI logs "Requested to load <class name of patcher.model>": each role gets a class of its own with a
    readable identifier (still a _PatcherModel holding our module), the same class for every module of a role."""
    rt = comfy_bridge.ComfyRuntime()
    expected = {"dit_high": "BerniniHighNoiseExpert", "dit_low": "BerniniLowNoiseExpert",
                "umt5": "BerniniUMT5TextEncoder", "vae": "BerniniWan21VAE", "planner": "BerniniPlanner",
                "planner_lm_head": "BerniniPlannerLMHead", "prompt_enhancer": "BerniniPromptEnhancer",
                "some_new-role": "BerniniSomeNewRole"}
    classes = {}
    for role, name in expected.items():
        module = torch.nn.Linear(2, 2)
        model = rt.handle(role, module).patcher.model
        assert type(model).__name__ == name and name.isidentifier() and "_PatcherModel" not in name
        assert isinstance(model, comfy_bridge._PatcherModel) and model.inner is module
        classes[role] = type(model)
    assert type(rt.handle("dit_high", torch.nn.Linear(2, 2)).patcher.model) is classes["dit_high"]
    assert len(set(classes.values())) == len(expected)

    class Pool:
        def shutdown(self):
            pass

    pool = Pool()
    comfy_bridge.track_pool(pool)
    assert type(pool._comfy_patcher.model).__name__ == "BerniniMultiGPUPool"
    assert isinstance(pool._comfy_patcher.model, comfy_bridge._PoolModel) and comfy.rec.loads[-1] == [pool._comfy_patcher]


def test_use_loads_through_load_models_gpu_and_never_offloads_itself(comfy):
    rt = comfy_bridge.ComfyRuntime()
    a, b = rt.handle("dit_high", torch.nn.Linear(3, 3)), rt.handle("vae", torch.nn.Linear(3, 3))
    with rt.use(a, b) as modules:
        assert modules == (a.module, b.module)
    assert comfy.rec.loads == [[a.patcher, b.patcher]]
    rt.release(a, b)
    a.offload()
    assert a.load() is a.module and comfy.rec.loads[-1] == [a.patcher]
    assert len(comfy.rec.loads) == 2


def test_modules_without_comfy_layers_are_loaded_whole(comfy):
    """transformers models (UMT5, Qwen) cannot be streamed under --lowvram: they must be force-loaded whole."""
    rt = comfy_bridge.ComfyRuntime()
    plain = rt.handle("umt5", torch.nn.Sequential(torch.nn.Linear(3, 3)))
    streamed = rt.handle("dit_high", torch.nn.Sequential(comfy_bridge.comfy_ops().Linear(3, 3)))
    with rt.use(streamed):
        pass
    with rt.use(plain):
        pass
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from bernini_core.quant import Fp8ScaledLinear

    # the planner mixes ComfyUI layers (connector, ViT decoder) with a transformers model: loaded whole;
    # so is an expert whose Linears keep fp8 weights (they cannot follow the input's device)
    mixed = rt.handle("planner", torch.nn.Sequential(comfy_bridge.comfy_ops().Linear(3, 3), T5LayerNorm(3)))
    fp8 = rt.handle("dit_low", torch.nn.Sequential(comfy_bridge.comfy_ops().LayerNorm(3), Fp8ScaledLinear(3, 3)))
    for handle in (mixed, fp8):
        with rt.use(handle):
            pass
    assert comfy.rec.full_loads == [False, True, True, True]


def test_stages_tell_the_memory_manager_their_working_memory(comfy, tiny_renderer_dir):
    """load_models_gpu gets the activation budget (as ComfyUI's sampler and VAE pass it), not only the weights."""
    from bernini_core.loaders import load_renderer
    from bernini_core.pipeline import RendererPipeline

    rt = comfy_bridge.ComfyRuntime()
    pipe = RendererPipeline(load_renderer(tiny_renderer_dir, dtype=torch.bfloat16, ops=comfy_bridge.comfy_ops()), rt)
    pipe("t2v", "a fox", num_frames=5, height=32, width=48, num_inference_steps=2)
    budgets = {p.model.inner.__class__.__name__: m for load, m in zip(comfy.rec.loads, comfy.rec.memory) for p in load}
    vae = pipe.components.vae
    assert budgets["WanVAE"] == vae.working_memory(32, 48) == 7000 * 4 * 6 * 64 * 4
    tokens = 2 * 2 * 3  # 2 latent frames x (4/2) x (6/2) patches, no sources in t2v
    assert budgets["BerniniDiT"] == pipe.experts.high.module.working_memory(tokens, 512) > 0


# ---------------------------------------------------------------------------------------------- progress
def test_one_progress_bar_per_stage_run_and_the_preview_setting(comfy):
    rt = comfy_bridge.ComfyRuntime()
    latent = torch.randn(1, 16, 3, 6, 10)
    for step in (1, 2, 3):
        rt.progress("sample", step, 3, latent=latent)
    rt.progress("sample", 1, 3, latent=latent)  # a new run of the same stage
    rt.progress("plan", 1, 3)  # another stage
    bars = comfy.rec.bars
    assert [[(v, t) for v, t, _ in bar.updates] for bar in bars] == [[(1, 3), (2, 3), (3, 3)], [(1, 3)], [(1, 3)]]
    kind, image, size = bars[0].updates[-1][2]
    assert (kind, size, image.mode, image.size) == ("JPEG", 256, "RGB", (10, 6))
    wan21 = comfy.modules["comfy.latent_formats"].Wan21
    assert np.abs(np.asarray(image).astype(int) - expected_preview(latent, wan21).astype(int)).max() <= 1
    assert bars[2].updates[0][2] is None  # planning has no latent to show

    cli = comfy.modules["comfy.cli_args"]
    cli.args.preview_method = cli.LatentPreviewMethod.NoPreviews
    rt.progress("sample", 1, 3, latent=latent)
    assert comfy.rec.bars[-1].updates == [(1, 3, None)]


# ---------------------------------------------------------------------------------------------- ops
def test_comfy_ops_cast_weights_and_allocate_parameters_under_dynamic_vram(comfy):
    comfy.modules["comfy.memory_management"].aimdo_enabled = True
    manual_cast = comfy.modules["comfy.ops"].manual_cast
    assert manual_cast.Linear(4, 3).weight is None  # the stand-in's dynamic-VRAM lazy init (what we defeat)
    ops = comfy_bridge.comfy_ops(torch.bfloat16)
    assert comfy_bridge.comfy_ops() is ops
    for name in comfy_bridge.OPS_LAYERS:
        assert issubclass(getattr(ops, name), getattr(manual_cast, name))
    linear = ops.Linear(4, 3, device="meta")
    assert linear.weight.shape == (3, 4) and linear.bias.shape == (3,)
    # an fp32 island: .float() input through a bf16 LayerNorm (plain torch refuses the mix on the CPU)
    norm = ops.LayerNorm(8).to(torch.bfloat16)
    # ComfyUI's layers skip weight init (reset_parameters is a no-op), so weight/bias are torch.empty memory
    # that can hold NaN (NaN != NaN fails torch.equal at random): give them seeded, non-trivial values.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(8, generator=gen))
        norm.bias.copy_(0.3 * torch.randn(8, generator=gen))
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError):
        torch.nn.LayerNorm(8).to(torch.bfloat16)(x)
    reference = torch.nn.functional.layer_norm(x, (8,), norm.weight.float(), norm.bias.float())
    assert torch.equal(norm(x), reference)


# ---------------------------------------------------------------------------------------------- pipelines
def test_renderer_runs_under_comfyui(comfy, tiny_renderer_dir):
    from bernini_core.loaders import load_renderer
    from bernini_core.pipeline import RendererPipeline

    comfy.modules["comfy.memory_management"].aimdo_enabled = True
    components = load_renderer(tiny_renderer_dir, dtype=torch.bfloat16, ops=comfy_bridge.comfy_ops())
    assert isinstance(components.dit_high.proj_out, comfy.modules["comfy.ops"].manual_cast.Linear)
    pipe = RendererPipeline(components, comfy_bridge.ComfyRuntime())
    rec = comfy.rec
    out = pipe("t2v", "a small red fox", **RENDER)

    # every large module is one CoreModelPatcher, loaded only through load_models_gpu
    modules = {id(m) for m in (components.dit_high, components.dit_low, components.vae,
                               components.text_encoder.module)}
    assert {id(p.model.inner) for p in rec.patchers} == modules and len(rec.patchers) == 4
    assert {id(p.model.inner) for load in rec.loads for p in load} == modules
    assert all(isinstance(p, comfy.modules["comfy.model_patcher"].CoreModelPatcher) for p in rec.patchers)
    # one bar for the run, advanced once per denoising step, each update with an RGB latent preview
    bar = rec.bars[-1]
    assert len(rec.bars) == 1 and [(v, t) for v, t, _ in bar.updates] == [(1, 3), (2, 3), (3, 3)]
    for _, _, (kind, image, size) in bar.updates:
        assert (kind, image.mode, image.size, size) == ("JPEG", "RGB", (48 // 8, 32 // 8), 256)

    # the same numbers as the standalone engine on torch.nn layers
    standalone = RendererPipeline(load_renderer(tiny_renderer_dir, dtype=torch.bfloat16), Runtime("cpu"))
    assert torch.equal(out.latents, standalone("t2v", "a small red fox", **RENDER).latents)

    # stage by stage: the preview shows the latent of that step; an interrupt stops the run mid-way and the
    # next run is unaffected
    settings = pipe.resolve("t2v", RENDER)
    embeds = pipe.encode_prompt("t2v", "a small red fox")
    sources = pipe.prepare_sources("t2v", num_frames=5)
    seen, previewed = [], []
    progress = pipe.runtime.progress

    def record(stage, step, total, latent=None):
        previewed.append(latent.clone())
        return progress(stage, step, total, latent=latent)

    pipe.runtime.progress = record
    latents = pipe.sample(embeds, sources, settings, on_step=lambda i, n, z: seen.append(z.clone()))
    del pipe.runtime.progress
    wan21 = comfy.modules["comfy.latent_formats"].Wan21
    for z, (_, _, (_, image, _)) in zip(previewed, rec.bars[-1].updates, strict=True):
        assert np.abs(np.asarray(image).astype(int) - expected_preview(z, wan21).astype(int)).max() <= 1
    # the preview shows the denoised estimate x0 = x_t − σ·v (as ComfyUI does), not the noisy latent
    assert (previewed[0] - seen[0]).abs().max() > 0.1

    rec.interrupt_at = rec.interrupt_checks + 2  # the second step's check
    with pytest.raises(comfy.mm.InterruptProcessingException):
        pipe.sample(embeds, sources, settings)
    assert [(v, t) for v, t, _ in rec.bars[-1].updates] == [(1, 3)]
    bars_before = len(rec.bars)
    assert torch.equal(pipe.sample(embeds, sources, settings), latents)
    assert len(rec.bars) == bars_before + 1 and len(rec.bars[-1].updates) == 3
    assert len(rec.patchers) == 4


def test_full_bernini_reports_planning_steps_and_stops_on_interrupt(comfy, tiny_bernini_v1_dir):
    from bernini_core.loaders_full import CLI_OVERRIDES, load_full
    from bernini_core.pipeline_full import FullPipeline

    components = load_full(tiny_bernini_v1_dir, dtype=torch.bfloat16, overrides=dict(CLI_OVERRIDES),
                           ops=comfy_bridge.comfy_ops())
    pipe = FullPipeline(components, comfy_bridge.ComfyRuntime(), torch.bfloat16)
    rec = comfy.rec
    reference = pipe("t2i", "a small red fox", **FULL).frames
    # planning then sampling: one bar each, one update per step; previews only while sampling
    assert [[(v, t) for v, t, _ in bar.updates] for bar in rec.bars] == [[(1, 2), (2, 2)], [(1, 2), (2, 2)]]
    assert [u[2] is None for bar in rec.bars for u in bar.updates] == [True, True, False, False]
    assert any(p.model.inner is components.planner for p in rec.patchers)
    assert any(p.model.inner is components.planner for load in rec.loads for p in load)

    rec.interrupt_at = rec.interrupt_checks + 1  # the first planning step's check
    with pytest.raises(comfy.mm.InterruptProcessingException):
        pipe("t2i", "a small red fox", **FULL)
    assert len(rec.bars) == 2  # stopped before reporting any step
    assert torch.equal(pipe("t2i", "a small red fox", **FULL).frames, reference)
    planner_patchers = [p for p in rec.patchers if p.model.inner is components.planner]
    assert len(planner_patchers) == 1  # wrapped on every planning call, one patcher


# ---------------------------------------------------------------------------------------------- folders
def test_model_folders(comfy):
    models = comfy.models
    for folder in ("bernini/Bernini-R-Diffusers", "bernini/Bernini-R-Diffusers/transformer",
                   "bernini/org/Bernini-Diffusers-v2"):
        (models / folder).mkdir(parents=True)
        (models / folder / "config.json").write_text("{}")
    (models / "bernini" / "no-config").mkdir()
    (models / "elsewhere").mkdir()
    (models / "elsewhere" / "config.json").write_text("{}")
    (models / "vae" / "sub").mkdir(parents=True)
    (models / "vae" / "sub" / "wan_2.1_vae.safetensors").write_bytes(b"")
    (models / "diffusion_models").mkdir()

    comfy_bridge.register_model_folders()
    comfy_bridge.register_model_folders()
    folder_paths = comfy.modules["folder_paths"]
    assert folder_paths.get_folder_paths("bernini") == [str(models / "bernini")]
    assert comfy_bridge.list_models("bernini") == ["Bernini-R-Diffusers", "org/Bernini-Diffusers-v2"]
    assert comfy_bridge.list_models("vae") == ["sub/wan_2.1_vae.safetensors"]
    assert comfy_bridge.list_models("diffusion_models") == []
    # ComfyUI lists only its own extensions under diffusion_models; GGUF experts are listed beside them
    for name in ("high.safetensors", "q4/low.gguf", "notes.txt"):
        (models / "diffusion_models" / name).parent.mkdir(parents=True, exist_ok=True)
        (models / "diffusion_models" / name).write_bytes(b"")
    assert folder_paths.get_filename_list("diffusion_models") == ["high.safetensors"]
    assert comfy_bridge.list_models("diffusion_models") == ["high.safetensors", "q4/low.gguf"]
    assert comfy_bridge.model_path("diffusion_models", "q4/low.gguf") == models / "diffusion_models/q4/low.gguf"
    with pytest.raises(BerniniError, match="models/diffusion_models/"):
        comfy_bridge.model_path("diffusion_models", "missing.gguf")
    found = comfy_bridge.model_path("bernini", "org/Bernini-Diffusers-v2")
    assert found == (models / "bernini/org/Bernini-Diffusers-v2").resolve()
    assert comfy_bridge.model_path("vae", "sub/wan_2.1_vae.safetensors") == models / "vae/sub/wan_2.1_vae.safetensors"
    with pytest.raises(BerniniError, match=r"'Bernini-Diffusers'.*models/bernini/"):
        comfy_bridge.model_path("bernini", "Bernini-Diffusers")
    with pytest.raises(BerniniError, match="models/bernini/"):
        comfy_bridge.model_path("bernini", "no-config")
    with pytest.raises(BerniniError, match="models/bernini/"):
        comfy_bridge.model_path("bernini", "../elsewhere")  # no way out of the folder
    with pytest.raises(BerniniError, match=r"vae file 'missing.safetensors'.*models/vae/"):
        comfy_bridge.model_path("vae", "missing.safetensors")
    assert comfy_bridge.models_root() == models

    report = comfy_bridge.download_progress(4)
    report(1)
    report(2)
    report(5, 10)  # done of total, the form download.py uses for a two-argument callback
    assert [(v, t) for v, t, _ in comfy.rec.bars[-1].updates] == [(1, 4), (3, 4), (5, 10)]


def test_the_stand_in_is_gone_after_the_fixture():
    assert not any(name == "comfy" or name.startswith("comfy.") or name == "folder_paths" for name in sys.modules)
    assert not comfy_bridge.comfy_available()
