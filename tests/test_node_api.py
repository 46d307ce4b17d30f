"""The nodes called directly on the tiny checkpoints, without ComfyUI.

The reference is `BerniniPipeline.from_pretrained(folder)(task, prompt, ...)` with the pipeline's file inputs; the
node chain gets IMAGE tensors made from the same uint8 frames and must give bit-identical frames and raw latents,
for every task with Bernini-R, full Bernini v1 and v2. Then the sentinels, the single-file loader, native LATENTs
and every contradiction the nodes refuse.
"""

import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bernini_core import BerniniError, BerniniPipeline, comfy_bridge, loaders
from bernini_core.media import read_video
from bernini_core.runtime import Runtime
from bernini_core.text_encoder import UMT5TextEncoder, negative_prompt
from bernini_core.tiny import TINY_DIT, TINY_VAE
from bernini_core.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "custom_nodes_x_ComfyUI-Bernini_node_api_test"
TASKS = ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")
FOLLOW_SOURCE = ("v2v", "mv2v", "rv2v")  # full-Bernini presets with height = width = 0: the output follows the source
PROMPT = "a small red fox"
SEED = 7
OMEGAS_AT_PRESET = (-1.0, -1.0, -1.0, -1.0, -1.0)
# the bridge as written (the module fixture below points it at the tiny checkpoints)
BRIDGE = {name: getattr(comfy_bridge, name) for name in ("list_models", "model_path", "runtime")}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pack():
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
        yield SimpleNamespace(**{k: cls() for k, cls in module.NODE_CLASS_MAPPINGS.items()})
    finally:
        for name in [n for n in sys.modules if n == PACK_NAME or n.startswith(PACK_NAME + ".")]:
            sys.modules.pop(name)


@pytest.fixture(scope="module")
def comfy_models(tiny_renderer_dir, tiny_bernini_v1_dir, tiny_bernini_v2_dir, tmp_path_factory):
    """ComfyUI's model folders, pointed at the tiny checkpoints (bridge.list_models / model_path patched)."""
    from bernini_core.tiny import make_tiny_comfy_files

    single = make_tiny_comfy_files(tmp_path_factory.mktemp("comfy_files"))
    folders = {"Bernini-R-Diffusers": tiny_renderer_dir, "Bernini-Diffusers": tiny_bernini_v1_dir,
               "Bernini-Diffusers-v2": tiny_bernini_v2_dir}
    files = {"diffusion_models": {"high_bf16.safetensors": single["high"], "low_fp8.safetensors": single["low"]},
             "vae": {"wan_2.1_vae_tiny.safetensors": single["vae"]},
             # the tiny UMT5 weights in transformers names are a valid single file; its tokenizer comes from the
             # folder (the tiny tokenizer is not a SentencePiece model ComfyUI would embed)
             "text_encoders": {"umt5_tiny.safetensors": tiny_renderer_dir / "text_encoder" / "model.safetensors"}}
    table = {"bernini": folders, **files}
    umt5_calls = []
    original = UMT5TextEncoder.from_single_file
    original_dit_file, original_vae = loaders.load_dit_file, loaders.load_vae

    def model_path(kind, name):
        if name not in table[kind]:
            raise BerniniError(f"{kind} {name!r} was not found")
        return Path(table[kind][name])

    def from_single_file(cls, path, *, dtype=torch.bfloat16):
        umt5_calls.append((Path(path), dtype))
        return original(path, dtype=dtype, tokenizer_dir=tiny_renderer_dir / "tokenizer")

    patch = pytest.MonkeyPatch()
    patch.setattr(comfy_bridge, "list_models", lambda kind: list(table[kind]))
    patch.setattr(comfy_bridge, "model_path", model_path)
    patch.setattr(comfy_bridge, "runtime", lambda device="auto", offload=True: Runtime("cpu", offload=offload))
    patch.setattr(UMT5TextEncoder, "from_single_file", classmethod(from_single_file))
    # single files carry no config: the head dim is Wan's 128 in every release, the tiny DiT's is smaller
    patch.setattr(loaders, "load_dit_file",
                  lambda path, **kw: original_dit_file(path, head_dim=TINY_DIT["attention_head_dim"], **kw))
    # ... and a VAE file carries none either (the standard Wan 2.1 VAE unless told otherwise)
    patch.setattr(loaders, "load_vae", lambda path, **kw: original_vae(
        path, config=VAEConfig.from_dict(TINY_VAE) if Path(path).is_file() else None, **kw))
    try:
        yield SimpleNamespace(folders=folders, umt5_calls=umt5_calls)
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def loaded(pack, comfy_models):
    """Each model loaded once through the loader nodes."""
    renderers = {key: pack.BerniniLoadRenderer.load(name, "bf16", "auto", "never")
                 for key, name in (("R", "Bernini-R-Diffusers"), ("v1", "Bernini-Diffusers"),
                                   ("v2", "Bernini-Diffusers-v2"))}
    planners = {key: pack.BerniniLoadPlanner.load(name, "bf16", "never")[0]
                for key, name in (("v1", "Bernini-Diffusers"), ("v2", "Bernini-Diffusers-v2"))}
    return SimpleNamespace(renderers=renderers, planners=planners)


@pytest.fixture(scope="module")
def pipes(comfy_models):
    """The reference pipelines, loaded independently of the nodes."""
    return {key: BerniniPipeline.from_pretrained(path, device="cpu", dtype="bf16")
            for key, path in (("R", comfy_models.folders["Bernini-R-Diffusers"]),
                              ("v1", comfy_models.folders["Bernini-Diffusers"]),
                              ("v2", comfy_models.folders["Bernini-Diffusers-v2"]))}


def _write_video(path, frames_u8, fps):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames_u8.shape[1], frames_u8.shape[2], "yuv420p"
        for frame in frames_u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _image(u8: np.ndarray) -> torch.Tensor:
    """ComfyUI IMAGE: float32 [B,H,W,3] in 0..1 from uint8 frames."""
    tensor = torch.from_numpy(np.array(u8, copy=True)).float() / 255.0
    return tensor.unsqueeze(0) if tensor.dim() == 3 else tensor


@pytest.fixture(scope="module")
def media(media_dir, tmp_path_factory):
    """File inputs for the pipeline and the same uint8 frames as IMAGE inputs for the nodes."""
    root = tmp_path_factory.mktemp("node_media")
    rng = np.random.default_rng(1)
    ref_video = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    _write_video(root / "ref_video_12.mp4", ref_video, 12)  # ads2v: the reference clip has its own frame rate
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "ref0b.png")  # ref0's size

    video_u8, video_fps = read_video(media_dir / "source.mp4")
    ref_video_u8, ref_fps = read_video(root / "ref_video_12.mp4")
    assert (video_fps, ref_fps) == (24.0, 12.0)
    paths = {"video": str(media_dir / "source.mp4"), "ref_video": str(root / "ref_video_12.mp4"),
             "ref0": str(media_dir / "ref0.png"), "ref0b": str(root / "ref0b.png"), "ref1": str(media_dir / "ref1.png")}
    pixels = {name: np.asarray(Image.open(paths[name]).convert("RGB")) for name in ("ref0", "ref0b", "ref1")}
    return SimpleNamespace(paths=paths, video=_image(video_u8), ref_video=_image(ref_video_u8), fps=video_fps,
                           ref_fps=ref_fps,
                           ref0=_image(pixels["ref0"]), ref1=_image(pixels["ref1"]),
                           ref_batch=_image(np.stack([pixels["ref0"], pixels["ref0b"]])))


def task_inputs(task, media):
    """(pipeline keyword inputs, Bernini Sources inputs) holding the same media."""
    p = media.paths
    video = {"source_video": media.video, "video_fps": media.fps}
    return {
        "t2i": ({}, {}),
        "t2v": ({}, {}),
        "i2i": ({"image": p["ref0"]}, {"source_image": media.ref0}),
        "v2v": ({"video": p["video"]}, video),
        "mv2v": ({"video": p["video"]}, video),
        "ads2v": ({"video": [p["video"], p["ref_video"]]},
                  {**video, "reference_video": media.ref_video, "reference_video_fps": media.ref_fps}),
        # a batch of two same-size references, then one of another size
        "r2v": ({"images": [p["ref0"], p["ref0b"], p["ref1"]]},
                {"reference_images": media.ref_batch, "reference_image_2": media.ref1}),
        "rv2v": ({"video": p["video"], "images": [p["ref0"], p["ref1"]]},
                 {**video, "reference_images": media.ref0, "reference_image_4": media.ref1}),
    }[task]


def run_nodes(pack, loaded, key, task, sources_inputs, *, size=32, seed=SEED, negative="", plan_args=(2, 1, -1.0, -1.0),
              sample_args=("auto", 2, 0.0) + OMEGAS_AT_PRESET, expert_boundary=-1.0, frames=5, max_image_size=48):
    renderer, text_encoder, vae = loaded.renderers[key]
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, task, PROMPT, negative)
    (sources,) = pack.BerniniSources.prepare(cond, vae, size, size, frames, 16, max_image_size, **sources_inputs)
    if key != "R":
        (cond,) = pack.BerniniPlanSemantics.plan(loaded.planners[key], cond, sources, *plan_args, seed)
    (latent,) = pack.BerniniSampleVideo.sample(renderer, cond, sources, *sample_args, seed, expert_boundary)
    (images,) = pack.BerniniDecodeVAE.decode(vae, latent, False, 256, 64)
    return latent, images


def run_pipeline(pipe, key, task, file_inputs, *, size=32, seed=SEED, **kwargs):
    settings = dict(num_frames=5, max_image_size=48, num_inference_steps=2, seed=seed, **kwargs)
    if size:
        settings.update(height=size, width=size)
    if key != "R":
        settings = dict(dict(planning_step=2, vit_denoising_step=1), **settings)
    return pipe(task, PROMPT, **file_inputs, **settings)


# ------------------------------------------------------------------ 1. node chain == pipeline, every task and model
@pytest.mark.parametrize("key", ["R", "v1", "v2"])
@pytest.mark.parametrize("task", TASKS)
def test_node_chain_equals_the_pipeline(pack, loaded, pipes, media, key, task):
    file_inputs, sources_inputs = task_inputs(task, media)
    size = 0 if key != "R" and task in FOLLOW_SOURCE else 32  # 0: the preset (full Bernini edits follow the source)
    latent, images = run_nodes(pack, loaded, key, task, sources_inputs, size=size)
    out = run_pipeline(pipes[key], key, task, file_inputs, size=size)
    assert torch.equal(images, out.frames)
    assert images.dtype == torch.float32 and images.device.type == "cpu" and images.shape[-1] == 3
    samples = latent["samples"]
    assert torch.equal(samples, out.latents)  # RAW Wan latents (the pipeline's latents are de-normalised)
    assert samples.shape == (1, 16, (images.shape[0] - 1) // 4 + 1, images.shape[1] // 8, images.shape[2] // 8)


# ------------------------------------------------------------------ 2. sentinels and overrides
def test_sentinels_take_the_preset_of_the_task_and_model(pack, loaded):
    def bundle(key, task):
        _, text_encoder, vae = loaded.renderers[key]
        (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, task, PROMPT, "")
        return cond, pack.BerniniSources.prepare(cond, vae, 0, 0, 0, 16, 0)[0]

    # docs/official_behaviour.md §5.3: 81 frames, 480x848, max 848, the Chinese negative prompt
    cond, sources = bundle("R", "t2v")
    assert (sources.num_frames, sources.height, sources.width, sources.max_image_size) == (81, 480, 848, 848)
    assert cond.negative_prompt == negative_prompt("default_zh")
    cond, sources = bundle("v1", "t2i")  # docs/official_behaviour.md §5.1: 1 frame, 512x512, max 842
    assert (sources.num_frames, sources.height, sources.width, sources.max_image_size) == (1, 512, 512, 842)
    assert cond.negative_prompt == negative_prompt("default_zh")
    _, text_encoder, _ = loaded.renderers["v2"]
    assert pack.BerniniEncodePrompt.encode(text_encoder, "r2v", PROMPT, "")[0].negative_prompt == \
        negative_prompt("english")  # docs/official_behaviour.md §5.2: v2 r2v uses the English negative
    assert pack.BerniniEncodePrompt.encode(text_encoder, "r2v", PROMPT, "no dogs")[0].negative_prompt == "no dogs"


def test_every_non_sentinel_widget_overrides_the_preset(pack, loaded, pipes, media):
    args = ("t2v", 3, 3.0, 1.5, -1.0, 2.5, -1.0, 0.5)  # mode, steps, flow_shift, ω vid, img, txt, tgt, scale
    latent, images = run_nodes(pack, loaded, "R", "t2v", {}, size=48, frames=9, sample_args=args, seed=11,
                               negative="blurry")
    out = pipes["R"]("t2v", PROMPT, num_frames=9, height=48, width=48, max_image_size=48, guidance_mode="t2v",
                     num_inference_steps=3, flow_shift=3.0, omega_vid=1.5, omega_txt=2.5, omega_scale=0.5, seed=11,
                     neg_prompt="blurry")
    assert torch.equal(images, out.frames) and images.shape == (9, 48, 48, 3)
    default = run_nodes(pack, loaded, "R", "t2v", {}, size=48, frames=9, seed=11, negative="blurry")[1]
    assert not torch.equal(default, images)


def test_planner_and_full_sampler_widgets_override_the_preset(pack, loaded, pipes):
    sample_args = ("vae_txt_vit", 2, 4.0, -1.0, -1.0, 3.0, 0.8, -1.0)
    _, images = run_nodes(pack, loaded, "v2", "t2v", {}, seed=5, plan_args=(3, 2, 2.0, 1.5), sample_args=sample_args)
    out = run_pipeline(pipes["v2"], "v2", "t2v", {}, seed=5, planning_step=3, vit_denoising_step=2, vit_txt_cfg=2.0,
                       vit_img_cfg=1.5, guidance_mode="vae_txt_vit", flow_shift=4.0, omega_txt=3.0, omega_tgt=0.8)
    assert torch.equal(images, out.frames)


def test_a_planner_in_another_dtype_plans_in_its_own_and_hands_the_renderers(pack, loaded, prepared):
    (planner,) = pack.BerniniLoadPlanner.load("Bernini-Diffusers", "fp32", "never")
    assert planner.dtype == torch.float32 and next(planner.bundle.model.parameters()).dtype == torch.float32
    v1 = prepared["v1"]
    (cond,) = pack.BerniniPlanSemantics.plan(planner, v1.cond, v1.sources, 2, 1, -1.0, -1.0, SEED)
    assert {c.dtype for c in cond.plan.contexts.values()} == {torch.bfloat16}  # the renderer's dtype
    assert {c.dtype for c in v1.planned.plan.contexts.values()} == {torch.bfloat16}
    assert loaded.renderers["v1"][0].pipeline.dtype == torch.bfloat16  # the shared pipeline is left as it was
    (latent,) = sample_call(pack, loaded.renderers["v1"][0], cond, v1.sources)
    assert torch.isfinite(latent["samples"]).all()


def test_expert_boundary_overrides_the_models_switch(pack, loaded, comfy_models):
    # 2 UniPC steps at shift 5: t = 999 then < 875, so the default switches experts and 0.5 does not.
    pipe = BerniniPipeline.from_pretrained(comfy_models.folders["Bernini-R-Diffusers"], device="cpu", dtype="bf16",
                                           switch_dit_boundary=0.5)
    out = pipe("t2v", PROMPT, num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=2, seed=SEED)
    _, images = run_nodes(pack, loaded, "R", "t2v", {}, expert_boundary=0.5)
    assert torch.equal(images, out.frames)
    assert not torch.equal(images, run_nodes(pack, loaded, "R", "t2v", {})[1])
    assert loaded.renderers["R"][0].pipeline.experts.boundary == 0.875  # the loaded model is left as it was


# ------------------------------------------------------------------ 3. single files and downloads
def test_single_files_load_bernini_r(pack, loaded, pipes, comfy_models):
    renderer, text_encoder, vae = pack.BerniniLoadRenderer.load(
        "single files", "bf16", "auto", "never", "high_bf16.safetensors", "none", "umt5_tiny.safetensors",
        "wan_2.1_vae_tiny.safetensors")
    assert renderer.family == "bernini_renderer" and renderer.version == "R"
    assert renderer.pipeline.experts.low is None and renderer.pipeline.experts.boundary == 0.0  # one expert
    assert comfy_models.umt5_calls[-1][1] == torch.bfloat16
    # the same weights as the folder's high expert, UMT5 and VAE: equal to the folder run without transformer_2
    reference = BerniniPipeline.from_pretrained(comfy_models.folders["Bernini-R-Diffusers"], device="cpu",
                                                dtype="bf16", skip_transformer_2=True)
    singles = SimpleNamespace(renderers={"R": (renderer, text_encoder, vae)})
    _, images = run_nodes(pack, singles, "R", "t2v", {})
    assert torch.equal(images, run_pipeline(reference, "R", "t2v", {}).frames)


def test_single_files_keep_fp8_experts_in_fp8(pack):
    renderer, text_encoder, vae = pack.BerniniLoadRenderer.load(
        "single files", "fp8_e4m3fn", "auto", "never", "high_bf16.safetensors", "low_fp8.safetensors",
        "umt5_tiny.safetensors", "wan_2.1_vae_tiny.safetensors")
    low = renderer.pipeline.components.dit_low
    assert any(p.dtype == torch.float8_e4m3fn for p in low.parameters())
    assert renderer.pipeline.experts.boundary == 0.875
    _, images = run_nodes(pack, SimpleNamespace(renderers={"R": (renderer, text_encoder, vae)}), "R", "t2v", {})
    assert images.shape == (5, 32, 32, 3) and torch.isfinite(images).all()


def test_official_models_go_through_the_downloader(pack, comfy_models, monkeypatch, tmp_path):
    download = pytest.importorskip("bernini_core.download")
    calls, bars = [], []
    folders = dict(comfy_models.folders)
    found = comfy_bridge.model_path  # the fixture's: the tiny folders

    def ensure(name, root, *, part="all", allow_download=False, progress=None):
        calls.append((name, Path(root), part, allow_download))
        if progress is not None:  # as download.py reports files: (done, total)
            progress(1, 3)
            progress(3, 3)
        if not allow_download and Path(root) == tmp_path / "bernini":
            raise BerniniError(f"hf download ByteDance/{name}")
        return folders[name]

    def progress_bar(total=0):
        bars.append([])
        return lambda done=1, total=None: bars[-1].append((done, total))

    monkeypatch.setattr(download, "ensure_official_model", ensure)
    monkeypatch.setattr(comfy_bridge, "download_progress", progress_bar)
    monkeypatch.setattr(comfy_bridge, "models_root", lambda: tmp_path)
    # found in models/bernini: checked for the part in place; "if missing" may complete it there
    assert pack.BerniniLoadRenderer.load("Bernini-R-Diffusers", "bf16", "auto", "if missing")[0].version == "R"
    assert calls[-1] == ("Bernini-R-Diffusers", folders["Bernini-R-Diffusers"].parent, "renderer", True)
    assert bars == [[(1, 3), (3, 3)]]  # the downloader's reports reach one ComfyUI progress bar
    # not found: models/bernini of ComfyUI's models folder; "never" gives the downloader's message
    monkeypatch.setattr(comfy_bridge, "model_path", lambda kind, name: (_ for _ in ()).throw(BerniniError("absent")))
    with pytest.raises(BerniniError, match="hf download"):
        pack.BerniniLoadRenderer.load("Bernini-R-Diffusers", "bf16", "auto", "never")
    assert calls[-1] == ("Bernini-R-Diffusers", tmp_path / "bernini", "renderer", False) and len(bars) == 1
    planner = pack.BerniniLoadPlanner.load("Bernini-Diffusers-v2", "bf16", "if missing")[0]
    assert planner.version == "v2" and calls[-1] == ("Bernini-Diffusers-v2", tmp_path / "bernini", "planner", True)
    monkeypatch.setattr(comfy_bridge, "model_path", found)


def test_nodes_run_inside_comfyui(pack, pipes, tiny_renderer_dir, tmp_path, monkeypatch):
    """With the ComfyUI stand-in of tests/comfy_stub.py: models come from folder_paths' models/bernini, run through
    ComfyRuntime (ModelPatchers, load_models_gpu, a progress bar per step) and give the standalone numbers."""
    spec = importlib.util.spec_from_file_location("bernini_node_tests_comfy_stub", ROOT / "tests" / "comfy_stub.py")
    stub = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, stub)  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(stub)
    modules, rec = stub.build(tmp_path / "models")
    for name, original in BRIDGE.items():
        monkeypatch.setattr(comfy_bridge, name, original)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    shutil.copytree(tiny_renderer_dir, tmp_path / "models" / "bernini" / "Bernini-R-Diffusers")

    assert pack.BerniniLoadRenderer.INPUT_TYPES()["required"]["model"][0] == [
        "single files", "Bernini-Diffusers", "Bernini-Diffusers-v2", "Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers"]
    renderer, text_encoder, vae = pack.BerniniLoadRenderer.load("Bernini-R-Diffusers", "bf16", "auto", "never")
    assert isinstance(renderer.pipeline.runtime, comfy_bridge.ComfyRuntime)
    models = SimpleNamespace(renderers={"R": (renderer, text_encoder, vae)})
    _, images = run_nodes(pack, models, "R", "t2v", {})
    assert torch.equal(images, run_pipeline(pipes["R"], "R", "t2v", {}).frames)
    assert len(rec.patchers) == 4 and all(load for load in rec.loads)  # UMT5, 2 experts, VAE via load_models_gpu
    assert [(v, t) for v, t, _ in rec.bars[-1].updates] == [(1, 2), (2, 2)]  # one update per denoising step


# ------------------------------------------------------------------ 4. LATENT and decoding
def test_decode_takes_native_wan_latents_and_batches(pack, loaded, pipes):
    vae = loaded.renderers["R"][2]
    first = run_pipeline(pipes["R"], "R", "t2v", {})
    second = run_pipeline(pipes["R"], "R", "t2v", {}, seed=SEED + 1)
    native = {"samples": torch.cat([first.latents, second.latents])}  # raw Wan 2.1 latents, batch 2
    (images,) = pack.BerniniDecodeVAE.decode(vae, native, False, 256, 64)
    assert torch.equal(images, torch.cat([first.frames, second.frames]))


def test_tiled_decode_matches_the_pipelines_tiled_decode(pack, loaded, pipes):
    # One decoding path (BerniniPipeline.decode_raw) behind the pipeline and the node, fed the same raw latents
    # (BerniniOutput.latents is the tensor the pipeline decoded): equal bit for bit on any machine.
    out = pipes["R"]("t2v", PROMPT, num_frames=5, height=96, width=96, num_inference_steps=2, seed=SEED,
                     vae_tile_px=64, vae_tile_overlap_px=16)
    (tiled,) = pack.BerniniDecodeVAE.decode(loaded.renderers["R"][2], {"samples": out.latents}, True, 64, 16)
    (untiled,) = pack.BerniniDecodeVAE.decode(loaded.renderers["R"][2], {"samples": out.latents}, False, 256, 64)
    assert tiled.shape == untiled.shape == out.frames.shape == (5, 96, 96, 3)
    assert torch.equal(tiled, out.frames)
    assert (tiled - untiled).abs().max() > 1e-4  # the tiles were really blended


def test_decode_refuses_what_is_not_a_wan21_latent(pack, loaded):
    vae = loaded.renderers["R"][2]
    with pytest.raises(BerniniError, match="Wan 2.1 video LATENT"):
        pack.BerniniDecodeVAE.decode(vae, {"samples": torch.zeros(1, 48, 2, 4, 4)}, False, 256, 64)
    with pytest.raises(BerniniError, match="tile_overlap 256 must be smaller than tile_size 256"):
        pack.BerniniDecodeVAE.decode(vae, {"samples": torch.zeros(1, 16, 1, 4, 4)}, True, 256, 256)


# ------------------------------------------------------------------ 5. contradictions
@pytest.fixture(scope="module")
def prepared(pack, loaded):
    """t2v conditioning and sources of every model, planned for the full ones."""
    out = {}
    for key in ("R", "v1", "v2"):
        _, text_encoder, vae = loaded.renderers[key]
        (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, "t2v", PROMPT, "")
        (sources,) = pack.BerniniSources.prepare(cond, vae, 32, 32, 5, 16, 48)
        planned = pack.BerniniPlanSemantics.plan(loaded.planners[key], cond, sources, 2, 1, -1.0, -1.0, SEED)[0] \
            if key != "R" else None
        out[key] = SimpleNamespace(cond=cond, sources=sources, planned=planned)
    return out


def sample_call(pack, renderer, cond, sources, mode="auto"):
    return pack.BerniniSampleVideo.sample(renderer, cond, sources, mode, 2, 0.0, *OMEGAS_AT_PRESET, SEED, -1.0)


def test_sampling_refuses_contradicting_inputs(pack, loaded, prepared):
    r, v1, v2 = (loaded.renderers[k][0] for k in ("R", "v1", "v2"))
    with pytest.raises(BerniniError, match=r"planned by Bernini v1 but the renderer is Bernini v2"):
        sample_call(pack, v2, prepared["v1"].planned, prepared["v2"].sources)
    with pytest.raises(BerniniError, match=r"plan \(Plan Bernini Semantics\) from Bernini v2 .*Bernini-R"):
        sample_call(pack, r, prepared["v2"].planned, prepared["R"].sources)
    with pytest.raises(BerniniError, match="connect Plan Bernini Semantics"):
        sample_call(pack, v2, prepared["v2"].cond, prepared["v2"].sources)
    with pytest.raises(BerniniError, match="conditioning comes from the Bernini-R text encoder"):
        sample_call(pack, v1, prepared["R"].cond, prepared["v1"].sources)
    with pytest.raises(BerniniError, match="sources comes from Bernini-R but renderer from Bernini v2"):
        sample_call(pack, v2, prepared["v2"].planned, prepared["R"].sources)
    with pytest.raises(BerniniError, match="'t2v_apg' is a Bernini-R mode but the renderer is Bernini v2"):
        sample_call(pack, v2, prepared["v2"].planned, prepared["v2"].sources, "t2v_apg")
    with pytest.raises(BerniniError, match="'vae_txt_vit_wapg' is a full-Bernini mode but the renderer is Bernini-R"):
        sample_call(pack, r, prepared["R"].cond, prepared["R"].sources, "vae_txt_vit_wapg")
    (t2i,) = pack.BerniniEncodePrompt.encode(loaded.renderers["R"][1], "t2i", PROMPT, "")
    with pytest.raises(BerniniError, match="task 't2i' but the sources were prepared for 't2v'"):
        sample_call(pack, r, t2i, prepared["R"].sources)
    with pytest.raises(BerniniError, match="expert_boundary 1.5 must be in"):
        pack.BerniniSampleVideo.sample(r, prepared["R"].cond, prepared["R"].sources, "auto", 2, 0.0,
                                       *OMEGAS_AT_PRESET, SEED, 1.5)
    # NaN passes ComfyUI's min/max widget check, so the node checks it (and a NaN omega through the settings)
    with pytest.raises(BerniniError, match="expert_boundary is nan"):
        pack.BerniniSampleVideo.sample(r, prepared["R"].cond, prepared["R"].sources, "auto", 2, 0.0,
                                       *OMEGAS_AT_PRESET, SEED, float("nan"))
    with pytest.raises(BerniniError, match="omega_txt is nan"):
        pack.BerniniSampleVideo.sample(r, prepared["R"].cond, prepared["R"].sources, "auto", 2, 0.0,
                                       -1.0, -1.0, float("nan"), -1.0, -1.0, SEED, -1.0)


def test_planning_refuses_contradicting_inputs(pack, loaded, prepared):
    p1, p2 = loaded.planners["v1"], loaded.planners["v2"]
    with pytest.raises(BerniniError, match="planner is Bernini v1 but the conditioning comes from the Bernini v2"):
        pack.BerniniPlanSemantics.plan(p1, prepared["v2"].cond, prepared["v2"].sources, 2, 1, -1.0, -1.0, SEED)
    with pytest.raises(BerniniError, match="Bernini-R, which renders without a planner"):
        pack.BerniniPlanSemantics.plan(p2, prepared["R"].cond, prepared["R"].sources, 2, 1, -1.0, -1.0, SEED)
    with pytest.raises(BerniniError, match="sources comes from Bernini-R but conditioning from Bernini v2"):
        pack.BerniniPlanSemantics.plan(p2, prepared["v2"].cond, prepared["R"].sources, 2, 1, -1.0, -1.0, SEED)
    with pytest.raises(BerniniError, match="already carries a plan"):
        pack.BerniniPlanSemantics.plan(p2, prepared["v2"].planned, prepared["v2"].sources, 2, 1, -1.0, -1.0, SEED)


def test_sources_refuse_inputs_the_task_cannot_use(pack, loaded, media):
    def sources(key, task, **inputs):
        _, text_encoder, vae = loaded.renderers[key]
        (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, task, PROMPT, "")
        return pack.BerniniSources.prepare(cond, vae, 32, 32, 5, 16, 48, **inputs)

    with pytest.raises(BerniniError, match="task 'v2v' .*connect source_video"):
        sources("R", "v2v")
    with pytest.raises(BerniniError, match="task 'ads2v' .*connect source_video"):
        sources("v2", "ads2v", reference_video=media.ref_video)
    with pytest.raises(BerniniError, match="task 't2v' .*takes no source video"):
        sources("R", "t2v", source_video=media.video)
    with pytest.raises(BerniniError, match="takes no reference_video"):
        sources("R", "v2v", source_video=media.video, reference_video=media.ref_video)
    with pytest.raises(BerniniError, match="task 'i2i' .*connect source_image"):
        sources("v1", "i2i")
    with pytest.raises(BerniniError, match="task 't2i' .*takes no source image"):
        sources("R", "t2i", source_image=media.ref0)
    with pytest.raises(BerniniError, match="task 'r2v' .*needs reference images"):
        sources("R", "r2v")
    with pytest.raises(BerniniError, match="task 't2v' .*takes no reference images"):
        sources("R", "t2v", reference_image_3=media.ref1)
    with pytest.raises(BerniniError, match="source_image holds 2 images"):
        sources("R", "i2i", source_image=media.ref_batch)
    _, text_encoder, _ = loaded.renderers["v2"]
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, "t2v", PROMPT, "")
    with pytest.raises(BerniniError, match="conditioning comes from Bernini v2 but vae from Bernini-R"):
        pack.BerniniSources.prepare(cond, loaded.renderers["R"][2], 32, 32, 5, 16, 48)
    with pytest.raises(BerniniError, match="prompt is empty"):
        pack.BerniniEncodePrompt.encode(text_encoder, "t2v", "  ", "")


def test_loaders_refuse_unknown_or_incomplete_choices(pack, comfy_models):
    with pytest.raises(BerniniError, match="'Bernini-X' is neither an official Bernini model"):
        pack.BerniniLoadRenderer.load("Bernini-X", "bf16", "auto", "never")
    with pytest.raises(BerniniError, match="Bernini-R-Diffusers.* has no planner"):
        pack.BerniniLoadPlanner.load("Bernini-R-Diffusers", "bf16", "never")
    with pytest.raises(BerniniError, match="fp8_e4m3fn keeps fp8 single files in fp8"):
        pack.BerniniLoadRenderer.load("Bernini-R-Diffusers", "fp8_e4m3fn", "auto", "never")
    files = {"high_noise_model": "high_bf16.safetensors", "low_noise_model": "none",
             "text_encoder": "umt5_tiny.safetensors", "vae": "wan_2.1_vae_tiny.safetensors"}
    for missing in ("high_noise_model", "text_encoder", "vae"):
        chosen = dict(files, **{missing: "none"})
        with pytest.raises(BerniniError, match=f"'single files' needs {missing}"):
            pack.BerniniLoadRenderer.load("single files", "bf16", "auto", "never", **chosen)


def test_apg_settings_reach_the_bernini_r_sampler_and_are_refused_by_full_bernini(pack, loaded, prepared):
    """Bernini APG Settings = the pipeline called with the official --eta/--momentum/--norm_threshold."""
    renderer = loaded.renderers["R"][0]
    cond, sources = prepared["R"].cond, prepared["R"].sources
    (apg,) = pack.BerniniAPGSettings.settings(0.2, -0.5, 10.0)
    custom = pack.BerniniSampleVideo.sample(renderer, cond, sources, "auto", 2, 0.0, *OMEGAS_AT_PRESET, SEED, -1.0,
                                            apg=apg)[0]["samples"]
    preset = sample_call(pack, renderer, cond, sources)[0]["samples"]
    reference = renderer.pipeline("t2v", PROMPT, num_frames=5, height=32, width=32, max_image_size=48,
                                  num_inference_steps=2, seed=SEED, eta=0.2, momentum=-0.5,
                                  norm_threshold=(10.0, 10.0, 10.0))
    assert torch.equal(custom.cpu(), reference.latents) and not torch.equal(custom, preset)
    full = prepared["v2"]
    with pytest.raises(BerniniError, match="fixed settings"):
        pack.BerniniSampleVideo.sample(loaded.renderers["v2"][0], full.planned, full.sources, "auto", 2, 0.0,
                                       *OMEGAS_AT_PRESET, SEED, -1.0, apg=apg)
    with pytest.raises(BerniniError, match="norm_threshold"):
        pack.BerniniAPGSettings.settings(0.5, 0.0, -1.0)


# ------------------------------------------------------------------ 6. numbers ComfyUI's min/max check lets through
@pytest.mark.parametrize("name", ["video_fps", "reference_video_fps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sources_refuse_non_finite_frame_rates(pack, loaded, media, name, value):
    _, text_encoder, vae = loaded.renderers["R"]
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, "ads2v", PROMPT, "")
    with pytest.raises(BerniniError, match=f"Bernini Sources: {name} is"):
        pack.BerniniSources.prepare(cond, vae, 32, 32, 5, 16, 48, **{name: value})


def test_full_bernini_sources_refuse_sizes_off_the_16_grid(pack, loaded):
    _, text_encoder, vae = loaded.renderers["v1"]
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, "t2v", PROMPT, "")
    with pytest.raises(BerniniError, match="Bernini Sources: width × height 40x32 must be multiples of 16"):
        pack.BerniniSources.prepare(cond, vae, 40, 32, 5, 16, 48)


@pytest.mark.parametrize("args, fragment", [((2, 1, float("nan"), -1.0), "vit_txt_cfg"),
                                            ((2, 1, -1.0, float("inf")), "vit_img_cfg"),
                                            ((10**6, 1, -1.0, -1.0), "planning_step")])
def test_plan_refuses_non_finite_cfgs_and_huge_step_counts(pack, loaded, prepared, args, fragment):
    with pytest.raises(BerniniError, match=f"Plan Bernini Semantics: {fragment}"):
        pack.BerniniPlanSemantics.plan(loaded.planners["v1"], prepared["v1"].cond, prepared["v1"].sources, *args,
                                       SEED)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decode_refuses_non_finite_latents(pack, loaded, value):
    samples = torch.zeros(1, 16, 1, 4, 4)
    samples[0, 0, 0, 0, 0] = value
    with pytest.raises(BerniniError, match="NaN or inf"):
        pack.BerniniDecodeVAE.decode(loaded.renderers["R"][2], {"samples": samples}, False, 256, 64)


def test_encode_refuses_a_negative_prompt_that_is_not_text(pack, loaded):
    with pytest.raises(BerniniError, match="negative_prompt must be a string, got int"):
        pack.BerniniEncodePrompt.encode(loaded.renderers["R"][1], "t2v", PROMPT, 5)


def test_full_bernini_sampling_takes_any_seed_of_its_widget(pack, loaded, prepared):
    """The Sample node's seed only draws the noise (torch takes up to 2**64-1); the planner's seed is Plan's."""
    (latent,) = pack.BerniniSampleVideo.sample(loaded.renderers["v1"][0], prepared["v1"].planned,
                                               prepared["v1"].sources, "auto", 2, 0.0, *OMEGAS_AT_PRESET, 2**40, -1.0)
    assert torch.isfinite(latent["samples"]).all()
