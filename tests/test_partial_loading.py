"""Partial loads (`parts=`): a multi-process run loads the planner, UMT5 and the VAE on each group's leader only,
and just the DiT experts, memory-mapped, on the other ranks (issue 10 item 5).

For Bernini-R and full Bernini: an experts-only load builds and opens nothing else, its experts equal a full
load's, its `sample` of the full pipeline's embeddings / plan and sources gives the full pipeline's latents bit for
bit, and every stage needing a part it lacks says which part and how the pipeline was loaded.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import bernini_core.checkpoints as checkpoints
import bernini_core.loaders as loaders
import bernini_core.loaders_full as loaders_full
from bernini_core import BerniniError, BerniniPipeline
from bernini_core.loaders import load_renderer, resolve_parts
from bernini_core.loaders_full import load_full
from bernini_core.pipeline import RendererPipeline
from bernini_core.pipeline_full import FullPipeline

R_SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=3)
F_SMALL = dict(num_frames=5, height=0, width=0, max_image_size=48, num_inference_steps=2, planning_step=2,
               vit_denoising_step=1)
PLAN = dict(planning_step=2, vit_denoising_step=1, vit_txt_cfg=1.2, vit_img_cfg=1.0)


# ------------------------------------------------------------------ helpers
def _fail(what):
    def loader(*args, **kwargs):
        raise AssertionError(f"{what} was called by an experts-only load")

    return loader


@pytest.fixture
def files_read(monkeypatch):
    """Every safetensors file whose header or tensors are read (as resolved paths)."""
    import safetensors

    seen = []
    header, safe_open = checkpoints.read_safetensors_header, safetensors.safe_open

    def read_header(path):
        seen.append(Path(path).resolve())
        return header(path)

    def opened(path, *args, **kwargs):
        seen.append(Path(path).resolve())
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "read_safetensors_header", read_header)
    monkeypatch.setattr(safetensors, "safe_open", opened)
    return seen


def _under(files, folder: Path) -> list:
    folder = folder.resolve()
    return [f for f in files if folder == f or folder in f.parents]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _file_backed(module: torch.nn.Module, files) -> tuple:
    """(parameters lying inside a mapping of one of `files`, all parameters): the zero-copy check (Linux only)."""
    names = {str(Path(f).resolve()) for f in files}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in names:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    params = list(module.parameters())
    inside = [p for p in params if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    return len(inside), len(params)


def _missing_part(fragment: str, parts: str):
    return pytest.raises(BerniniError, match=rf"needs the {fragment} part.*loaded with parts={parts}")


# ------------------------------------------------------------------ the parts argument
def test_parts_are_validated():
    assert resolve_parts(None) == {"experts", "text_encoder", "vae", "planner"}
    assert resolve_parts("experts") == {"experts"}
    assert resolve_parts(["vae", "experts"]) == {"vae", "experts"}
    with pytest.raises(BerniniError, match="unknown part.*'dit'"):
        resolve_parts({"dit"})
    with pytest.raises(BerniniError, match="nothing to load"):
        resolve_parts(())
    with pytest.raises(BerniniError, match="collection of part names"):
        resolve_parts(3)


# ------------------------------------------------------------------ Bernini-R
@pytest.fixture(scope="module")
def r_full(tiny_renderer_dir):
    return RendererPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16")


def test_renderer_experts_only(tiny_renderer_dir, r_full, media_dir, monkeypatch, files_read):
    for name in ("load_vae", "read_vae_config", "check_umt5_folder", "check_tokenizer_folder"):
        monkeypatch.setattr(loaders, name, _fail(name))
    monkeypatch.setattr(loaders.UMT5TextEncoder, "from_pretrained", _fail("UMT5TextEncoder.from_pretrained"))
    steps = []
    pipe = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16", parts={"experts"},
                                           progress=lambda *report: steps.append(report))

    assert isinstance(pipe, RendererPipeline) and pipe.parts == {"experts"} and pipe.components.parts == {"experts"}
    assert pipe.components.text_encoder is None and pipe.components.vae is None
    assert pipe.text_encoder_handle is None and pipe.vae_handle is None
    assert steps[-1] == ("load", 2, 2)  # two experts, nothing else
    assert files_read and not _under(files_read, tiny_renderer_dir / "text_encoder")
    assert not _under(files_read, tiny_renderer_dir / "vae")
    _same_state(pipe.experts.high.module, r_full.experts.high.module)
    _same_state(pipe.experts.low.module, r_full.experts.low.module)
    assert pipe.experts.boundary == r_full.experts.boundary

    if sys.platform.startswith("linux"):  # bf16 file, bf16 load: every bf16 weight is a view of the mapped file
        high = pipe.experts.high.module
        inside, _ = _file_backed(high, (tiny_renderer_dir / "transformer").glob("*.safetensors"))
        assert inside == sum(p.dtype == torch.bfloat16 for p in high.parameters()) > 0

    video, refs = str(media_dir / "source.mp4"), [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    settings = r_full.resolve("rv2v", dict(R_SMALL, seed=5))
    embeds = r_full.encode_prompt("rv2v", "a small red fox", settings.get("neg_prompt"))
    sources = r_full.prepare_sources("rv2v", video=video, images=refs, fps=settings["fps"],
                                     num_frames=settings["num_frames"], max_image_size=settings["max_image_size"])
    assert torch.equal(pipe.sample(embeds, sources, settings), r_full.sample(embeds, sources, settings))

    label = r"\['experts'\]"
    with _missing_part("'text_encoder'", label):
        pipe.encode_prompt("t2v", "a fox")
    with _missing_part("'vae'", label):
        pipe.prepare_sources("v2v", video=video)
    latents = torch.zeros(1, 16, 1, 4, 4)
    with _missing_part("'vae'", label):
        pipe.decode(latents)
    with _missing_part("'vae'", label):
        pipe.decode_raw(latents)
    with _missing_part("'text_encoder' and 'vae'", label):
        pipe("t2v", "a fox", **R_SMALL)


def test_renderer_without_experts(tiny_renderer_dir, r_full, files_read):
    pipe = RendererPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16",
                                            parts=("text_encoder", "vae", "planner"))  # Bernini-R: planner ignored
    assert pipe.parts == {"text_encoder", "vae"} and pipe.experts is None
    assert pipe.components.dit_high is None and pipe.components.dit_low is None
    assert not _under(files_read, tiny_renderer_dir / "transformer")
    assert not _under(files_read, tiny_renderer_dir / "transformer_2")
    embeds = pipe.encode_prompt("t2v", "a fox", "blurry")
    full = r_full.encode_prompt("t2v", "a fox", "blurry")
    assert torch.equal(embeds.positive, full.positive) and torch.equal(embeds.negative, full.negative)
    with _missing_part("'experts'", r"\['text_encoder', 'vae'\]"):
        pipe.sample(embeds, r_full.prepare_sources("t2v"), r_full.resolve("t2v", dict(R_SMALL)))
    with pytest.raises(BerniniError, match="Bernini-R has no planner"):
        load_renderer(tiny_renderer_dir, parts={"planner"})


def test_renderer_checks_only_the_files_of_the_loaded_parts(tiny_renderer_dir, tmp_path):
    root = Path(shutil.copytree(tiny_renderer_dir, tmp_path / "Bernini-R-Diffusers"))
    (root / "vae" / "config.json").write_text("{broken", encoding="utf-8")
    (root / "text_encoder" / "model.safetensors").write_bytes(b"\0" * 16)
    components = load_renderer(root, dtype=torch.bfloat16, parts={"experts"})
    assert components.dit_high is not None and components.vae is None
    with pytest.raises(BerniniError, match="text_encoder"):
        load_renderer(root, dtype=torch.bfloat16)  # the full load still checks them
    config = root / "transformer_2" / "config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**data, "num_layers": "2"}), encoding="utf-8")
    with pytest.raises(BerniniError, match="num_layers"):  # the experts' own checks still happen
        load_renderer(root, dtype=torch.bfloat16, parts={"experts"})


def test_split_release_experts_only(tmp_path, monkeypatch, files_read):
    from bernini_core.tiny import TINY_DIT, make_tiny_split, tiny_dit_state_dict

    root = make_tiny_split(tmp_path / "split", seed=0)
    base = next(p for p in root.iterdir() if (p / "model_index.json").exists())
    shutil.rmtree(base / "vae")  # not needed, so not required
    monkeypatch.setattr(loaders.UMT5TextEncoder, "from_pretrained", _fail("UMT5TextEncoder.from_pretrained"))
    pipe = RendererPipeline.from_pretrained(base, high_noise_ckpt=root / "bernini_renderer_high",
                                            low_noise_ckpt=root / "bernini_renderer_low", device="cpu",
                                            dtype="fp32", parts={"experts"})
    assert pipe.parts == {"experts"} and pipe.components.text_encoder is None
    assert not _under(files_read, base / "text_encoder")
    high = pipe.experts.high.module.state_dict()
    assert all(torch.equal(high[k], v.float()) for k, v in tiny_dit_state_dict(TINY_DIT, 0, expert="high_ema").items())
    with pytest.raises(BerniniError, match="lacks vae"):
        load_renderer(base, high_noise_ckpt=root / "bernini_renderer_high",
                      low_noise_ckpt=root / "bernini_renderer_low", parts={"experts", "vae"})


# ------------------------------------------------------------------ full Bernini
@pytest.fixture(scope="module")
def f_full(tiny_bernini_v1_dir):
    return FullPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32")


def test_full_bernini_experts_only(tiny_bernini_v1_dir, f_full, media_dir, monkeypatch, files_read):
    for name in ("build_planner", "load_processor", "check_mllm_config", "load_vae", "read_vae_config",
                 "check_umt5_folder", "check_tokenizer_folder", "read_umt5_config", "_t5_from_checkpoint"):
        monkeypatch.setattr(loaders_full, name, _fail(name))
    monkeypatch.setattr(loaders_full.UMT5TextEncoder, "from_pretrained", _fail("UMT5TextEncoder.from_pretrained"))
    pipe = BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="fp32", parts=["experts"])

    assert isinstance(pipe, FullPipeline) and pipe.parts == {"experts"} and pipe.components.parts == {"experts"}
    components = pipe.components
    assert components.planner is None and components.processor is None and pipe.planner is None
    assert components.text_encoder is None and components.vae is None
    assert pipe.text_encoder_handle is None and pipe.vae_handle is None
    for folder in ("mllm", "t5_text_encoder", "vae"):
        assert not _under(files_read, tiny_bernini_v1_dir / folder), folder
    _same_state(pipe.experts.high.module, f_full.experts.high.module)
    _same_state(pipe.experts.low.module, f_full.experts.low.module)

    if sys.platform.startswith("linux"):  # fp32 checkpoint, fp32 load, no fp32 islands to cast: all mapped
        for expert in (pipe.experts.high.module, pipe.experts.low.module):
            inside, total = _file_backed(expert, (tiny_bernini_v1_dir / "bernini").glob("*.safetensors"))
            assert inside == total > 0

    task, video = "v2v", str(media_dir / "source.mp4")
    settings = f_full.resolve(task, dict(F_SMALL, seed=3))
    sources = f_full.prepare_sources(task, video=video, num_frames=5, height=0, width=0, max_image_size=48)
    embeds = f_full.encode_prompt(task, "a fox", settings["neg_prompt"])
    plan = f_full.plan_semantics(sources, embeds, prompt="a fox", neg_prompt=settings["neg_prompt"], seed=3, **PLAN)
    assert torch.equal(pipe.sample(plan, sources, settings), f_full.sample(plan, sources, settings))

    label = r"\['experts'\]"
    with _missing_part("'text_encoder'", label):
        pipe.encode_prompt(task, "a fox")
    with _missing_part("'vae'", label):
        pipe.prepare_sources(task, video=video, num_frames=5, height=0, width=0, max_image_size=48)
    with _missing_part("'planner'", label):
        pipe.plan_semantics(sources, embeds, prompt="a fox", neg_prompt="blurry", seed=3, **PLAN)
    with _missing_part("'vae'", label):
        pipe.decode(torch.zeros(1, 16, 1, 4, 4))
    with _missing_part("'text_encoder', 'vae' and 'planner'", label):
        pipe("t2v", "a fox", **dict(F_SMALL, height=32, width=32))
    # a planner handed over (as ComfyUI does) still plans: the same plan as the full pipeline's
    shared = pipe.plan_semantics(sources, embeds, prompt="a fox", neg_prompt=settings["neg_prompt"], seed=3,
                                 planner=f_full.planner, **PLAN)
    assert all(torch.equal(shared.contexts[k], plan.contexts[k]) for k in plan.contexts)


def test_full_bernini_leader_parts_and_checks(tiny_bernini_v1_dir, tmp_path):
    components = load_full(tiny_bernini_v1_dir, dtype=torch.float32, parts={"planner", "text_encoder"})
    assert components.parts == {"planner", "text_encoder"}
    assert components.planner is not None and components.text_encoder is not None
    assert components.dit_high is None and components.dit_low is None and components.vae is None
    # with_renderer narrows parts further, as before
    planner_only = load_full(tiny_bernini_v1_dir, dtype=torch.float32, with_renderer=False,
                             parts={"planner", "vae"})
    assert planner_only.parts == {"planner"} and planner_only.vae is None

    root = tmp_path / "Bernini-Diffusers"
    shutil.copytree(tiny_bernini_v1_dir, root)
    shutil.rmtree(root / "vae")
    (root / "t5_text_encoder" / "config.json").write_text("{broken", encoding="utf-8")
    experts = load_full(root, dtype=torch.float32, parts={"experts"})  # neither is needed nor read
    assert experts.dit_high is not None and experts.vae is None
    with pytest.raises(BerniniError, match="vae"):
        load_full(root, dtype=torch.float32)
    config = root / "transformer_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(json.dumps({**data, "text_dim": data["text_dim"] + 1}), encoding="utf-8")
    with pytest.raises(BerniniError, match="text_dim"):  # the experts' config checks still run
        load_full(root, dtype=torch.float32, parts={"experts"})
