"""Checkpoint reading, key maps, fp8-scaled weights and layout detection (bernini_core.checkpoints / quant / keymaps).

References: diffusers' own Wan converter (single_file_utils), diffusers WanTransformer3DModel as the load
target, and the formulas of ComfyUI's fp8 "scaled" format (weight.float() * scale).
"""

import json
import shutil

import pytest
import torch

from bernini_core import tiny
from bernini_core.checkpoints import (
    HIGH_NOISE_PREFIXES, LOW_NOISE_PREFIXES, Layout, TensorSource, detect_layout, find_prefix, load_weights_,
    read_json, split_checkpoint_source,
)
from bernini_core.errors import BerniniError
from bernini_core.keymaps.wan_dit import (
    comfy_prefix, dit_key_from_original, dit_key_to_original, is_diffusers_dit_keys, is_original_wan_keys,
)
from bernini_core.quant import (
    Fp8ScaledLinear, dequantize_fp8_state, fp8_format_of, fp8_ops, iter_dequantized, normalize_quant_key,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

KEEP_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")  # diffusers _keep_in_fp32_modules


def bf16_policy(name):
    return torch.float32 if any(part in name for part in KEEP_FP32) else torch.bfloat16


def dit_model_config():
    return {k: v for k, v in tiny.TINY_DIT.items() if not k.startswith("_")}


def meta_dit():
    with torch.device("meta"):
        return WanTransformer3DModel(**dit_model_config())


def fp8_key_map(key):
    name = normalize_quant_key(key)
    return None if name is None else dit_key_from_original(name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "renderer": tiny.make_tiny_renderer(root / "renderer", seed=0),
        "renderer_1p3b": tiny.make_tiny_renderer(root / "renderer_1p3b", variant="1.3b", seed=0),
        "split": tiny.make_tiny_split(root / "split", seed=0),
        "comfy": tiny.make_tiny_comfy_files(root / "comfy", seed=0),
    }


def original_wan_state_dict(num_layers=2, inner=48, ffn=64, text_dim=32, freq=256):
    """Original Wan module names transcribed from docs/wan_qwen.md §1.3 (independent of our key map)."""
    g = torch.Generator().manual_seed(7)
    shapes = {
        "patch_embedding.weight": (inner, 16, 1, 2, 2), "patch_embedding.bias": (inner,),
        "text_embedding.0.weight": (inner, text_dim), "text_embedding.0.bias": (inner,),
        "text_embedding.2.weight": (inner, inner), "text_embedding.2.bias": (inner,),
        "time_embedding.0.weight": (inner, freq), "time_embedding.0.bias": (inner,),
        "time_embedding.2.weight": (inner, inner), "time_embedding.2.bias": (inner,),
        "time_projection.1.weight": (6 * inner, inner), "time_projection.1.bias": (6 * inner,),
        "head.head.weight": (64, inner), "head.head.bias": (64,), "head.modulation": (1, 2, inner),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, inner)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"] = (inner, inner)
                shapes[f"{b}{attn}.{proj}.bias"] = (inner,)
            shapes[f"{b}{attn}.norm_q.weight"] = (inner,)
            shapes[f"{b}{attn}.norm_k.weight"] = (inner,)
        shapes[b + "norm3.weight"] = (inner,)
        shapes[b + "norm3.bias"] = (inner,)
        shapes[b + "ffn.0.weight"], shapes[b + "ffn.0.bias"] = (ffn, inner), (ffn,)
        shapes[b + "ffn.2.weight"], shapes[b + "ffn.2.bias"] = (inner, ffn), (inner,)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# -- key maps ------------------------------------------------------------------------------------
def test_key_map_matches_diffusers_converter():
    sd = original_wan_state_dict()
    sd["blocks.1.self_attn.q.scale_weight"] = torch.tensor(0.5)  # fp8 side tensors ride along
    sd["blocks.0.ffn.2.scale_weight"] = torch.tensor(0.25)
    reference = convert_wan_transformer_to_diffusers(dict(sd))
    ours = {dit_key_from_original(k): v for k, v in sd.items()}
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key] is value
    # the mapped weights are exactly the diffusers model's parameter set
    model_keys = set(meta_dit().state_dict())
    assert {k for k in ours if not k.endswith("scale_weight")} == model_keys
    assert dit_key_from_original("blocks.3.norm3.weight") == "blocks.3.norm2.weight"  # the norm2/norm3 trap
    assert dit_key_from_original("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert dit_key_from_original("head.modulation") == "scale_shift_table"
    assert dit_key_from_original("blocks.3.modulation") == "blocks.3.scale_shift_table"


def test_key_map_round_trips():
    original = list(original_wan_state_dict())
    assert [dit_key_to_original(dit_key_from_original(k)) for k in original] == original
    diffusers_keys = list(meta_dit().state_dict())
    assert [dit_key_from_original(dit_key_to_original(k)) for k in diffusers_keys] == diffusers_keys
    assert dit_key_to_original("scale_shift_table") == "head.modulation"
    assert dit_key_to_original("blocks.0.scale_shift_table") == "blocks.0.modulation"
    assert dit_key_to_original("blocks.0.norm2.bias") == "blocks.0.norm3.bias"


def test_key_detection_and_comfy_prefix():
    original = list(original_wan_state_dict())
    prefixed = ["model.diffusion_model." + k for k in original] + ["scaled_fp8"]
    assert comfy_prefix(prefixed) == "model.diffusion_model."
    assert comfy_prefix(original) == ""
    assert is_original_wan_keys(original) and is_original_wan_keys(prefixed)
    assert not is_diffusers_dit_keys(original)
    diffusers_keys = list(meta_dit().state_dict())
    assert is_diffusers_dit_keys(diffusers_keys) and not is_original_wan_keys(diffusers_keys)
    # the diffusers converter strips the same prefix: identical results
    sd = {k: torch.zeros(1) for k in prefixed if k != "scaled_fp8"}
    reference = convert_wan_transformer_to_diffusers(dict(sd))
    prefix = comfy_prefix(sd)
    assert set(reference) == {dit_key_from_original(k[len(prefix):]) for k in sd}


# -- fp8 scaled ----------------------------------------------------------------------------------
def quantized_pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g) * 0.3
    scale = weight.abs().amax() / 448.0
    return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(())


def test_dequantize_fp8_state_formula_and_cleanup():
    q, scale = quantized_pair((32, 16))
    q2, scale2 = quantized_pair((16, 32), seed=1)
    bias = torch.randn(32).to(torch.bfloat16)
    tag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    sd = {
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "a.weight": q, "a.scale_weight": scale, "a.scale_input": torch.tensor(1.0), "a.bias": bias,
        "b.weight": q2, "b.weight_scale": scale2, "b.comfy_quant": tag,  # the newer ComfyUI naming
        "norm.weight": torch.ones(16),
    }
    out = dequantize_fp8_state(sd, torch.bfloat16)
    assert set(out) == {"a.weight", "a.bias", "b.weight", "norm.weight"}
    assert torch.equal(out["a.weight"], (q.float() * scale).to(torch.bfloat16))
    assert torch.equal(out["b.weight"], (q2.float() * scale2).to(torch.bfloat16))
    assert out["a.bias"] is bias and out["norm.weight"] is sd["norm.weight"]
    assert "a.scale_weight" in sd  # input untouched
    assert normalize_quant_key("b.weight_scale") == "b.scale_weight"
    assert normalize_quant_key("scaled_fp8") is None and normalize_quant_key("b.comfy_quant") is None

    bad = {"c.weight": q, "c.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}
    with pytest.raises(BerniniError, match="nvfp4"):
        dequantize_fp8_state(bad, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_linear_equals_dequantized_linear(dtype):
    q, scale = quantized_pair((32, 64))
    layer = Fp8ScaledLinear(64, 32, bias=True, dtype=dtype)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.scale_weight = scale.clone()
    layer.bias.data = torch.randn(32).to(dtype)
    reference = torch.nn.Linear(64, 32, dtype=dtype)
    reference.weight.data = (q.float() * scale).to(dtype)
    reference.bias.data = layer.bias.data.clone()
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))
    # an unquantised weight makes it a plain Linear
    plain = Fp8ScaledLinear(64, 32, dtype=dtype)
    plain.weight.data, plain.bias.data = reference.weight.data.clone(), reference.bias.data.clone()
    with torch.no_grad():
        assert torch.equal(plain(x), reference(x))
    ops = fp8_ops()
    assert issubclass(ops.Linear, Fp8ScaledLinear) and ops.Conv3d is torch.nn.Conv3d


def test_fp8_format_detection(files, tmp_path):
    from safetensors.torch import save_file

    assert fp8_format_of(TensorSource.open(files["comfy"]["low"])) == "float8_e4m3fn"
    assert fp8_format_of(TensorSource.open(files["comfy"]["high"])) is None
    packed = tmp_path / "nvfp4.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(4, 2, dtype=torch.uint8),
               "blocks.0.ffn.0.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
              str(packed))
    with pytest.raises(BerniniError, match="nvfp4"):
        fp8_format_of(TensorSource.open(packed))
    described = tmp_path / "int8.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(4, 4, dtype=torch.int8)}, str(described),
              metadata={"_quantization_metadata": json.dumps({"layers": {"blocks.0.ffn.0": {"format": "int8_tensorwise"}}})})
    with pytest.raises(BerniniError, match="int8_tensorwise"):
        fp8_format_of(TensorSource.open(described))


def swap_linears_for_fp8(module):
    """Emulate a DiT built from fp8_ops(): every Linear becomes Fp8ScaledLinear (on meta)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, fp8_ops().Linear(child.in_features, child.out_features, child.bias is not None,
                                                   device="meta", dtype=torch.float32))
        else:
            swap_linears_for_fp8(child)


def dit_forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    context = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), context, return_dict=False)[0]


def test_comfy_fp8_file_keep_and_dequantize_paths_agree(files):
    path = files["comfy"]["low"]
    assert detect_layout(path) == Layout.WAN_SINGLE_FILE
    # reference: dequantise at load time into a plain diffusers model (fp32)
    reference = WanTransformer3DModel(**dit_model_config())
    source = TensorSource.open(path)
    load_weights_(reference, iter_dequantized(source.iter_shards(), torch.float32), key_map=dit_key_from_original,
                  dtype_for=lambda name: torch.float32, origin=str(path))
    # keep-fp8: Fp8ScaledLinear layers hold the fp8 bytes + scales
    kept = WanTransformer3DModel(**dit_model_config())  # on CPU so its RoPE tables (non-persistent) exist
    swap_linears_for_fp8(kept)
    load_weights_(kept, source, key_map=fp8_key_map, dtype_for=lambda name: torch.float32, device="cpu")
    assert kept.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert kept.condition_embedder.time_proj.weight.dtype == torch.float32  # stored unquantised in the file
    assert float(kept.condition_embedder.time_proj.scale_weight) == 1.0  # default for unscaled layers
    assert not any(t.is_meta for t in kept.state_dict().values())
    assert torch.equal(dit_forward(kept), dit_forward(reference))
    # and the dequantised weights are the quantised originals within fp8 resolution
    original = tiny.tiny_dit_state_dict(expert="low", dtype=torch.float32)
    w = reference.blocks[1].ffn.net[2].weight
    ref_w = original["blocks.1.ffn.net.2.weight"]
    rel = ((w - ref_w).norm() / ref_w.norm()).item()
    assert 0 < rel < 0.05


# -- prefixes / EMA / split ----------------------------------------------------------------------
def test_find_prefix_official_order():
    assert find_prefix(["diff_dec.transformer.a", "transformer.a"], HIGH_NOISE_PREFIXES) == "diff_dec.transformer."
    assert find_prefix(["transformer.a", "t5.x"], HIGH_NOISE_PREFIXES) == "transformer."
    assert find_prefix(["ema.transformer_2.a"], LOW_NOISE_PREFIXES) == "transformer_2."
    assert find_prefix(["blocks.0.a"], LOW_NOISE_PREFIXES) == ""
    with pytest.raises(BerniniError):
        find_prefix([], HIGH_NOISE_PREFIXES)


def test_split_checkpoint_prefers_ema_and_strips_prefix(files):
    root = files["split"]
    high = split_checkpoint_source(root, "high")
    ema = tiny.tiny_dit_state_dict(expert="high_ema")
    raw = tiny.tiny_dit_state_dict(expert="high")
    assert set(high.keys()) == set(ema)
    for key in ("proj_out.weight", "blocks.1.attn2.to_k.weight"):
        assert torch.equal(high.get(key), ema[key]) and not torch.equal(high.get(key), raw[key])
    low = split_checkpoint_source(root / "bernini_renderer_low" / "model.safetensors.index.json", "low")
    assert torch.equal(low.get("proj_out.weight"), tiny.tiny_dit_state_dict(expert="low")["proj_out.weight"])
    assert all(not k.startswith(("t5_text_encoder.", "diff_dec.")) for k in low.keys())
    no_ema = TensorSource.open(root / "bernini_renderer_high", prefix="diff_dec.transformer.")
    assert torch.equal(no_ema.get("proj_out.weight"), raw["proj_out.weight"])
    with pytest.raises(BerniniError, match="swap"):
        split_checkpoint_source(root / "bernini_renderer_low", "high")
    with pytest.raises(BerniniError, match="swap"):
        split_checkpoint_source(root / "bernini_renderer_high", "low")


# -- lazy loading ----------------------------------------------------------------------------------
def test_shard_by_shard_load_into_meta_model(files):
    folder = files["renderer"] / "transformer"
    source = TensorSource.open(folder)
    assert len(source.files()) == 2 and source.dtype("proj_out.weight") == torch.bfloat16
    model = meta_dit()
    seen = []

    def watched_shards():
        for shard in source.iter_shards():
            if seen:  # the previous shard is already in the model before the next is read
                assert all(not model.get_parameter(k).is_meta for k in seen[-1])
            assert all(model.get_parameter(k).is_meta for k in shard)
            seen.append(list(shard))
            yield shard

    load_weights_(model, watched_shards(), dtype_for=bf16_policy, origin=str(folder))
    assert len(seen) == 2 and not set(seen[0]) & set(seen[1])
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["blocks.0.scale_shift_table"].dtype == torch.float32


def test_comfy_bf16_file_equals_diffusers_layout(files):
    model = meta_dit()
    load_weights_(model, TensorSource.open(files["comfy"]["high"]), key_map=dit_key_from_original,
                  dtype_for=lambda name: torch.bfloat16)
    expected = TensorSource.open(files["renderer"] / "transformer")
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected.get(key)), key


def test_strict_load_reports_missing_unexpected_and_shapes(files):
    source = TensorSource.open(files["renderer"] / "transformer")
    shard = {k: source.get(k) for k in source.keys() if not k.startswith("blocks.1.")}
    shard["not_a_param.weight"] = torch.zeros(1)
    with pytest.raises(BerniniError) as info:
        load_weights_(meta_dit(), shard, origin="tiny.safetensors")
    message = str(info.value)
    assert "tiny.safetensors" in message and "Missing 27" in message and "blocks.1." in message
    assert "not_a_param.weight" in message and "more" in message
    report = load_weights_(meta_dit(), shard, strict=False)
    assert len(report.missing) == 27 and report.unexpected == ["not_a_param.weight"]
    bad = {"proj_out.weight": torch.zeros(3, 3)}
    with pytest.raises(BerniniError, match=r"shape \(3, 3\).*\(64, 48\)"):
        load_weights_(meta_dit(), bad, strict=False)


def test_tied_parameters_stay_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            self.head.weight = self.shared.weight

    with torch.device("meta"):
        module = Tied()
    load_weights_(module, {"shared.weight": torch.arange(8.0).reshape(4, 2)})
    assert module.head.weight is module.shared.weight and module.head.weight[3, 1] == 7


# -- errors and layout detection -----------------------------------------------------------------
def test_missing_shard_bin_and_bad_files(files, tmp_path):
    broken = tmp_path / "transformer"
    shutil.copytree(files["renderer"] / "transformer", broken)
    (broken / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BerniniError) as info:
        TensorSource.open(broken)
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in str(info.value)
    assert "diffusion_pytorch_model.safetensors.index.json" in str(info.value)

    pickle_file = tmp_path / "wan.pth"
    pickle_file.write_bytes(b"\x80\x02not really")
    for call in (TensorSource.open, detect_layout):
        with pytest.raises(BerniniError, match="safetensors only"):
            call(pickle_file)
    pickle_dir = tmp_path / "pickles"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x02")
    for call in (TensorSource.open, detect_layout):
        with pytest.raises(BerniniError, match="safetensors only"):
            call(pickle_dir)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(BerniniError, match="not a safetensors file"):
        TensorSource.open(garbage)
    with pytest.raises(BerniniError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_detect_layout_errors(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BerniniError, match="empty"):
        detect_layout(empty)

    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "notes.txt").write_text("hello")
    with pytest.raises(BerniniError) as info:
        detect_layout(other)
    assert "notes.txt" in str(info.value) and "Accepted" in str(info.value) and "Bernini-R-Diffusers" in str(info.value)

    corrupted = tmp_path / "corrupted"
    shutil.copytree(files["renderer"], corrupted)
    (corrupted / "config.json").write_text('{"model_type": "bernini_renderer", ')
    with pytest.raises(BerniniError) as info:
        detect_layout(corrupted)
    assert "config.json" in str(info.value) and "not valid JSON" in str(info.value)
    with pytest.raises(BerniniError, match="not valid JSON"):
        read_json(corrupted / "config.json")

    with pytest.raises(BerniniError, match="WanTransformer3DModel.*parent folder"):
        detect_layout(files["renderer"] / "transformer")
    with pytest.raises(BerniniError, match="no Wan diffusion-transformer"):
        detect_layout(files["comfy"]["vae"])
    incomplete = tmp_path / "incomplete"
    shutil.copytree(files["renderer"], incomplete)
    shutil.rmtree(incomplete / "transformer_2")
    with pytest.raises(BerniniError, match="transformer_2"):
        detect_layout(incomplete)


def test_detect_layout_every_layout(files, tmp_path):
    split = files["split"]
    assert detect_layout(files["renderer"]) == Layout.RENDERER_DIFFUSERS
    assert detect_layout(files["renderer_1p3b"]) == Layout.RENDERER_DIFFUSERS
    assert detect_layout(files["renderer"] / "config.json") == Layout.RENDERER_DIFFUSERS
    assert detect_layout(split / tiny.WAN_BASE_DIRNAME) == Layout.WAN_DIFFUSERS
    assert detect_layout(split) == Layout.SPLIT_RENDERER
    assert detect_layout(split / "bernini_renderer_high") == Layout.SPLIT_RENDERER
    assert detect_layout(split / "bernini_renderer_low" / "model.safetensors.index.json") == Layout.SPLIT_RENDERER
    assert detect_layout(files["comfy"]["high"]) == Layout.WAN_SINGLE_FILE
    assert detect_layout(files["comfy"]["low"]) == Layout.WAN_SINGLE_FILE

    from safetensors.torch import save_file
    single = tmp_path / "diffusers_dit.safetensors"
    save_file(tiny.tiny_dit_state_dict(), str(single))
    assert detect_layout(single) == Layout.DIFFUSERS_SINGLE_FILE

    full = tmp_path / "Bernini-Diffusers"
    for sub in ("bernini", "mllm", "vae"):
        (full / sub).mkdir(parents=True)
    (full / "config.json").write_text(json.dumps({"model_type": "bernini", "architectures": ["BerniniModel"]}))
    assert detect_layout(full) == Layout.BERNINI_FULL
    shutil.rmtree(full / "mllm")
    with pytest.raises(BerniniError, match="mllm/"):
        detect_layout(full)
