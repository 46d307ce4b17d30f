"""The node declarations: the pack registers exactly the contract's nodes, and every INPUT_TYPES() is valid
/object_info input (known types, sane COMBOs and ranges, tooltips) in the contract's widget order.

The expected table below is transcribed from the node contract (docs/node_contract.md), independently of the
node modules.
"""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "custom_nodes_x_ComfyUI-Bernini_nodes_test"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
PLANNER_SEED_MAX = 0xFFFFFFFF  # numpy seeds (the planner) take 32 bits

CUSTOM_TYPES = {"BERNINI_PLANNER", "BERNINI_RENDERER", "BERNINI_TEXT_ENCODER", "BERNINI_VAE", "BERNINI_CONDITIONING",
                "BERNINI_SOURCES", "BERNINI_APG", "BERNINI_PARALLEL"}
COMFY_TYPES = {"IMAGE", "LATENT", "INT", "FLOAT", "STRING", "BOOLEAN"}
TASKS = ["t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v"]
MODES = ["auto", "rv2v", "v2v", "v2v_chain", "t2v", "r2v_apg", "v2v_apg", "t2v_apg", "vae_txt_vit_wapg", "vae_txt_vit",
         "rv2v_wapg", "none"]
OMEGA = ("FLOAT", -1.0, -1.0, 20.0, 0.05)
# name -> (display name, category, [(input, type or combo list or None for model lists, default, min, max, step)],
#          optional inputs (same form), outputs [(type, name)])
CONTRACT = {
    "BerniniLoadPlanner": ("Load Bernini Planner", "Bernini/loaders", [
        ("model", "COMBO", "Bernini-Diffusers-v2"),
        ("weight_dtype", ["bf16", "fp16", "fp32"], "bf16"),
        ("download", ["never", "if missing"], "never"),
    ], [], [("BERNINI_PLANNER", "planner")]),
    "BerniniLoadRenderer": ("Load Bernini Renderer", "Bernini/loaders", [
        ("model", "COMBO", "Bernini-Diffusers-v2"),
        ("weight_dtype", ["bf16", "fp16", "fp32", "fp8_e4m3fn"], "bf16"),
        ("attention", ["auto", "sdpa", "flash", "sage"], "auto"),
        ("download", ["never", "if missing"], "never"),
    ], [
        ("high_noise_model", "COMBO", "none"), ("low_noise_model", "COMBO", "none"),
        ("text_encoder", "COMBO", "none"), ("vae", "COMBO", "none"), ("parallel", "BERNINI_PARALLEL", None),
        ("compile", "BOOLEAN", False),
    ], [("BERNINI_RENDERER", "renderer"), ("BERNINI_TEXT_ENCODER", "text_encoder"), ("BERNINI_VAE", "vae")]),
    "BerniniMultiGPU": ("Bernini Multi-GPU", "Bernini/loaders", [
        ("gpus", "STRING", "2", "single line"), ("ulysses", "INT", 0, 0, 64, None),
        ("cfg_parallel", "INT", 1, 1, 8, None), ("fsdp", "BOOLEAN", False), ("ray_address", "STRING", "", "single line"),
        ("device", ["cuda", "cpu"], "cuda"), ("timeout", "INT", 1800, 10, 86400, None),
    ], [], [("BERNINI_PARALLEL", "parallel")]),
    "BerniniEncodePrompt": ("Encode Bernini Prompt", "Bernini/conditioning", [
        ("text_encoder", "BERNINI_TEXT_ENCODER", None),
        ("task", TASKS, "t2v"),
        ("prompt", "STRING", ""),
        ("negative_prompt", "STRING", ""),
    ], [], [("BERNINI_CONDITIONING", "conditioning")]),
    "BerniniSources": ("Bernini Sources", "Bernini/conditioning", [
        ("conditioning", "BERNINI_CONDITIONING", None), ("vae", "BERNINI_VAE", None),
        ("width", "INT", 0, 0, 4096, 16), ("height", "INT", 0, 0, 4096, 16), ("frames", "INT", 0, 0, 1025, 1),
        ("fps", "INT", 16, 1, 120, None), ("max_image_size", "INT", 0, 0, 4096, 16),
    ], [
        ("source_video", "IMAGE", None), ("source_image", "IMAGE", None), ("reference_images", "IMAGE", None),
        ("reference_image_2", "IMAGE", None), ("reference_image_3", "IMAGE", None),
        ("reference_image_4", "IMAGE", None), ("reference_video", "IMAGE", None),
        ("video_fps", "FLOAT", 0.0, 0.0, 240.0, 0.001), ("reference_video_fps", "FLOAT", 0.0, 0.0, 240.0, 0.001),
    ], [("BERNINI_SOURCES", "sources")]),
    "BerniniPlanSemantics": ("Plan Bernini Semantics", "Bernini/conditioning", [
        ("planner", "BERNINI_PLANNER", None), ("conditioning", "BERNINI_CONDITIONING", None),
        ("sources", "BERNINI_SOURCES", None),
        ("planning_steps", "INT", 0, 0, 100, None), ("vit_denoising_steps", "INT", 0, 0, 50, None),
        ("vit_txt_cfg", "FLOAT", -1.0, -1.0, 10.0, 0.05), ("vit_img_cfg", "FLOAT", -1.0, -1.0, 10.0, 0.05),
        ("seed", "INT", 42, 0, PLANNER_SEED_MAX, None),
    ], [], [("BERNINI_CONDITIONING", "conditioning")]),
    "BerniniSampleVideo": ("Sample Bernini Video", "Bernini/sampling", [
        ("renderer", "BERNINI_RENDERER", None), ("conditioning", "BERNINI_CONDITIONING", None),
        ("sources", "BERNINI_SOURCES", None), ("guidance_mode", MODES, "auto"),
        ("steps", "INT", 0, 0, 200, None), ("flow_shift", "FLOAT", 0.0, 0.0, 20.0, 0.1),
        ("omega_vid",) + OMEGA, ("omega_img",) + OMEGA, ("omega_txt",) + OMEGA, ("omega_tgt",) + OMEGA,
        ("omega_scale", "FLOAT", -1.0, -1.0, 4.0, 0.05), ("seed", "INT", 42, 0, SEED_MAX, None),
        ("expert_boundary", "FLOAT", -1.0, -1.0, 1.0, 0.005), ("preset", ["official", "fast"], "official"),
        ("sampler", ["auto", "unipc", "euler", "distill"], "auto"),
    ], [("apg", "BERNINI_APG", None)], [("LATENT", "samples")]),
    "BerniniAPGSettings": ("Bernini APG Settings", "Bernini/sampling", [
        ("eta", "FLOAT", 0.5, 0.0, 2.0, 0.05), ("momentum", "FLOAT", 0.0, -1.0, 1.0, 0.05),
        ("norm_threshold", "FLOAT", 50.0, 0.0, 1000.0, 1.0),
    ], [], [("BERNINI_APG", "apg")]),
    "BerniniApplyLora": ("Apply Bernini LoRA", "Bernini/loaders", [
        ("renderer", "BERNINI_RENDERER", None), ("lora_name", "FILES", None),
        ("strength_high", "FLOAT", 1.0, -10.0, 10.0, 0.01), ("strength_low", "FLOAT", 1.0, -10.0, 10.0, 0.01),
    ], [], [("BERNINI_RENDERER", "renderer")]),
    "BerniniDecodeVAE": ("Decode Bernini VAE", "Bernini/latent", [
        ("vae", "BERNINI_VAE", None), ("samples", "LATENT", None), ("tiled", "BOOLEAN", False),
        ("tile_size", "INT", 256, 64, 2048, 16), ("tile_overlap", "INT", 64, 0, 1024, 16),
    ], [], [("IMAGE", "images")]),
    "BerniniEnhancePrompt": ("Enhance Bernini Prompt", "Bernini/conditioning", [
        ("task", TASKS, "t2v"), ("prompt", "STRING", ""), ("backend", ["local", "openai"], "local"),
        ("max_new_tokens", "INT", 1024, 1, 8192, 1), ("sampling", "BOOLEAN", False),
        ("sampling_seed", "INT", 0, 0, SEED_MAX, None),
    ], [
        ("planner", "BERNINI_PLANNER", None), ("source_video", "IMAGE", None), ("source_image", "IMAGE", None),
        ("reference_images", "IMAGE", None), ("reference_video", "IMAGE", None),
        ("endpoint_model", "STRING", "", "single line"),
    ], [("STRING", "prompt")]),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def pack():
    """The pack root imported the way ComfyUI imports it (mangled package name, no ComfyUI)."""
    assert "comfy" not in sys.modules
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
        yield module
    finally:
        for name in [n for n in sys.modules if n == PACK_NAME or n.startswith(PACK_NAME + ".")]:
            sys.modules.pop(name)


def _type_of(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def test_registers_exactly_the_contract_nodes(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(CONTRACT)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {k: v[0] for k, v in CONTRACT.items()}
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.__name__ == key
        assert cls.CATEGORY == CONTRACT[key][1]


@pytest.mark.parametrize("key", sorted(CONTRACT))
def test_input_types_are_valid_object_info_in_contract_order(pack, key):
    cls = pack.NODE_CLASS_MAPPINGS[key]
    info = cls.INPUT_TYPES()
    assert set(info) <= {"required", "optional", "hidden"}
    _, _, required, optional, outputs = CONTRACT[key]
    for section, expected in (("required", required), ("optional", optional)):
        inputs = info.get(section, {})
        assert list(inputs) == [row[0] for row in expected], f"{key} {section} order"
        for row in expected:
            name, kind = row[0], row[1]
            spec = inputs[name]
            assert isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict)
            options = spec[1]
            assert isinstance(options.get("tooltip"), str) and len(options["tooltip"]) > 10, f"{key}.{name} tooltip"
            actual_type = _type_of(spec)
            assert actual_type in CUSTOM_TYPES | COMFY_TYPES | {"COMBO"}, f"{key}.{name}: unknown type"
            if isinstance(kind, list):
                assert spec[0] == kind and options["default"] == row[2]
            elif kind == "FILES":  # ComfyUI's own file list (models/loras): may be empty, has no default
                assert actual_type == "COMBO" and isinstance(spec[0], list) and "default" not in options
                assert all(isinstance(c, str) for c in spec[0])
            elif kind == "COMBO":
                assert actual_type == "COMBO" and spec[0] and all(isinstance(c, str) for c in spec[0])
                assert len(set(spec[0])) == len(spec[0])
                assert options["default"] == row[2] and row[2] in spec[0]
            else:
                assert actual_type == kind, f"{key}.{name}"
            if actual_type == "COMBO" and kind != "FILES":
                assert options["default"] in spec[0]
            if actual_type in ("INT", "FLOAT"):
                default, low, high, step = row[2], row[3], row[4], row[5]
                assert options["default"] == default and options["min"] == low and options["max"] == high
                assert low <= options["default"] <= high
                if step is not None:
                    assert options["step"] == step
                assert isinstance(options["default"], int if actual_type == "INT" else float)
            if actual_type in ("STRING", "BOOLEAN"):
                assert options["default"] == row[2]
            if actual_type == "STRING":  # prompts are multi-line; settings (gpus, an address) single-line
                assert options.get("multiline") is (len(row) < 4 or row[3] != "single line")
            if actual_type not in WIDGET_TYPES:
                assert "default" not in options  # a socket, not a widget
    if "seed" in info["required"]:
        assert info["required"]["seed"][1].get("control_after_generate") is True

    assert list(cls.RETURN_TYPES) == [o[0] for o in outputs]
    assert list(cls.RETURN_NAMES) == [o[1] for o in outputs]
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    # ComfyUI calls FUNCTION with every input as a keyword; optional inputs may be absent
    parameters = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters.values())[1:]
    assert [p.name for p in parameters] == [row[0] for row in required + optional]
    assert all(p.default is not p.empty for p in parameters[len(required):])
    assert all(t in CUSTOM_TYPES | COMFY_TYPES for t in cls.RETURN_TYPES)


def test_model_lists_outside_comfyui_hold_the_official_names_and_none(pack):
    planner = pack.NODE_CLASS_MAPPINGS["BerniniLoadPlanner"].INPUT_TYPES()["required"]["model"][0]
    assert planner == ["Bernini-Diffusers", "Bernini-Diffusers-v2"]
    renderer = pack.NODE_CLASS_MAPPINGS["BerniniLoadRenderer"].INPUT_TYPES()
    assert renderer["required"]["model"][0] == ["single files", "Bernini-Diffusers", "Bernini-Diffusers-v2",
                                                "Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers"]
    for name in ("high_noise_model", "low_noise_model", "text_encoder", "vae"):
        assert renderer["optional"][name][0] == ["none"]


def test_model_lists_add_the_folders_and_files_comfyui_finds(pack, monkeypatch, tmp_path):
    from bernini_core import comfy_bridge

    renderer_only = tmp_path / "my-bernini-r"
    renderer_only.mkdir()
    (renderer_only / "config.json").write_text('{"model_type": "bernini_renderer"}')
    full = tmp_path / "my-bernini"
    full.mkdir()
    (full / "config.json").write_text('{"model_type": "bernini"}')
    listed = {"bernini": ["Bernini-R-Diffusers", "my-bernini-r", "my-bernini"],
              "diffusion_models": ["bernini_r_high.safetensors", "bernini_r_low.safetensors"],
              "text_encoders": ["umt5_xxl_fp16.safetensors"], "vae": ["wan_2.1_vae.safetensors"]}
    monkeypatch.setattr(comfy_bridge, "list_models", lambda kind: list(listed[kind]))
    monkeypatch.setattr(comfy_bridge, "model_path", lambda kind, name: tmp_path / name)
    planner = pack.NODE_CLASS_MAPPINGS["BerniniLoadPlanner"].INPUT_TYPES()["required"]["model"][0]
    assert planner == ["Bernini-Diffusers", "Bernini-Diffusers-v2", "my-bernini"]  # Bernini-R holds no planner
    renderer = pack.NODE_CLASS_MAPPINGS["BerniniLoadRenderer"].INPUT_TYPES()
    assert renderer["required"]["model"][0] == ["single files", "Bernini-Diffusers", "Bernini-Diffusers-v2",
                                                "Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers", "my-bernini-r",
                                                "my-bernini"]
    assert renderer["optional"]["low_noise_model"][0] == ["none"] + listed["diffusion_models"]
    assert renderer["optional"]["text_encoder"][0] == ["none"] + listed["text_encoders"]
    assert renderer["optional"]["vae"][0] == ["none"] + listed["vae"]


def test_every_node_has_its_doc_page(pack):
    for key in CONTRACT:
        doc = ROOT / "web" / "docs" / f"{key}.md"
        assert doc.is_file(), doc
        text = doc.read_text(encoding="utf-8")
        assert text.startswith(f"# {CONTRACT[key][0]}")
        for row in CONTRACT[key][2] + CONTRACT[key][3]:
            name = row[0].rstrip("234").rstrip("_")  # reference_image_2..4 are documented together
            assert name in text, f"{doc.name} does not mention {row[0]}"
