"""LoRAs for the DiT experts (bernini_core/lora): every published layout lands on the right parameters with
ComfyUI's arithmetic (W + strength · alpha/rank · up @ down, no alpha = multiplier 1, .diff / .diff_b / .diff_m),
per expert, in bf16 / fp32 / fp8 / GGUF layers; bad files and flags are named; the CLI merges before sampling.
Expected values are computed here from the tensors written (tests/lora_files.py names the modules by hand)."""

import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from bernini_core.errors import BerniniError
from bernini_core.lora import (LoraSpec, apply_loras_, canonical_state_dict, lora_module_map, lora_patches,
                               parse_lora_arg, read_lora)
from bernini_core.renderer.config import DiTConfig
from bernini_core.renderer.transformer import BerniniDiT
from bernini_core.tiny import TINY_DIT
from lora_files import LAYOUTS, MODULES, base_name, low_rank, write

ALL = ("q", "o2", "ffn", "text", "time_proj", "head", "patch")


def make_dit(seed=0, dtype=torch.float32, ops=None):
    torch.manual_seed(seed)
    dit = BerniniDiT(DiTConfig.from_dict(TINY_DIT), ops=ops)
    with torch.no_grad():
        for param in dit.parameters():
            param.normal_(0, 0.2)
    return dit.to(dtype).requires_grad_(False)


def snapshot(dit):
    return {name: param.detach().clone() for name, param in dit.named_parameters()}


def assert_only_changed(dit, before, expected, strength=1.0, exact=False):
    """Every parameter in `expected` equals before + strength·delta (float32, one rounding to its dtype); every other
    parameter is bit-identical."""
    for name, param in dit.named_parameters():
        if name in expected:
            want = (before[name].float() + strength * expected[name]).to(param.dtype)
            if exact:
                assert torch.equal(param, want), name
            else:
                torch.testing.assert_close(param, want, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(param, before[name]), f"{name} changed"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_patches_the_right_parameters(layout, tmp_path):
    dit = make_dit()
    before = snapshot(dit)
    state, expected = low_rank(dit, layout, ALL, rank=3, alpha=6.0)
    counts = apply_loras_(dit, [LoraSpec(write(tmp_path / "l.safetensors", state), 0.7)])
    assert counts == {"high": len(ALL)}
    assert_only_changed(dit, before, expected, 0.7)


def test_no_alpha_means_multiplier_one_and_bf16_rounds_once(tmp_path):
    dit = make_dit(dtype=torch.bfloat16)
    before = snapshot(dit)
    state, expected = low_rank(dit, "comfy", ("q", "head"), rank=4, alpha=None)
    assert not any(k.endswith(".alpha") for k in state)
    apply_loras_(dit, [write(tmp_path / "l.safetensors", state)])  # a plain path: strength 1, both experts
    assert_only_changed(dit, before, expected, exact=True)  # (W.float() + up@down).to(bf16), not up@down/rank


def test_lightx2v_full_weight_deltas(tmp_path):
    """.diff (weight), .diff_b (bias), .diff_m (modulation) as lightx2v ships them, the norm3 -> norm2 swap, and a
    low-rank pair without alpha (lightx2v's SVD pairs have none)."""
    dit = make_dit()
    before, params = snapshot(dit), dict(dit.named_parameters())
    gen = torch.Generator().manual_seed(3)

    def rand(name):
        return torch.randn(params[name].shape, generator=gen)

    targets = {  # LoRA key -> our parameter, written out by hand
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm2.weight",
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
        "diffusion_model.blocks.1.self_attn.k.diff_b": "blocks.1.attn1.to_k.bias",
        "diffusion_model.blocks.1.cross_attn.norm_q.diff": "blocks.1.attn2.norm_q.weight",
        "diffusion_model.blocks.0.diff_m": "blocks.0.scale_shift_table",
        "diffusion_model.head.diff_m": "scale_shift_table",
        "diffusion_model.head.head.diff": "proj_out.weight",
        "diffusion_model.head.head.diff_b": "proj_out.bias",
        "diffusion_model.patch_embedding.diff": "patch_embedding.weight",
        "diffusion_model.time_projection.1.diff_b": "condition_embedder.time_proj.bias",
    }
    state = {key: rand(name) for key, name in targets.items()}
    expected = {name: state[key] for key, name in targets.items()}
    pair, deltas = low_rank(dit, "comfy", ("ffn",), rank=2, alpha=None, seed=5)
    state.update(pair)
    expected.update(deltas)
    apply_loras_({"high": dit}, [LoraSpec(write(tmp_path / "x.safetensors", state), -0.4, "high")])
    assert_only_changed(dit, before, expected, -0.4)


def test_strength_zero_is_bit_identical_and_per_expert_strengths(tmp_path):
    high, low = make_dit(1, torch.bfloat16), make_dit(2, torch.bfloat16)
    high_before, low_before = snapshot(high), snapshot(low)
    a_state, a = low_rank(high, "kohya", ("q", "ffn"), alpha=1.5, seed=1)
    b_state, b = low_rank(high, "diffusers", ("q", "head"), seed=2)
    c_state, c = low_rank(high, "comfy", ("q",), alpha=3.0, seed=3)
    files = [write(tmp_path / f"{n}.safetensors", s) for n, s in (("a", a_state), ("b", b_state), ("c", c_state))]
    experts = {"high": high, "low": low}

    assert apply_loras_(experts, [LoraSpec(files[0], 0.0), LoraSpec(files[1], 0.0, "low")]) == {"high": 0, "low": 0}
    assert all(torch.equal(p, high_before[n]) for n, p in high.named_parameters())
    assert all(torch.equal(p, low_before[n]) for n, p in low.named_parameters())

    apply_loras_(experts, [f"{files[0]}:0.5:high", f"{files[1]}:-1.25:low", f"{files[2]}:2"])
    # each parameter: every patch of its expert on one float32 copy, in order, rounded to bf16 once (ComfyUI)
    want_high = {n: 0.5 * a.get(n, 0) + 2 * c.get(n, 0) for n in set(a) | set(c)}
    want_low = {n: -1.25 * b.get(n, 0) + 2 * c.get(n, 0) for n in set(b) | set(c)}
    assert_only_changed(high, high_before, want_high)
    assert_only_changed(low, low_before, want_low)


def test_low_expert_lora_on_a_one_expert_renderer_is_refused(tmp_path):
    dit = make_dit()
    state, _ = low_rank(dit, "comfy", ("q",))
    path = write(tmp_path / "l.safetensors", state)
    before = snapshot(dit)
    with pytest.raises(BerniniError, match="one expert.*'high' or 'both'"):
        apply_loras_(dit, [LoraSpec(path, 1.0, "both"), LoraSpec(path, 1.0, "low")])
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())  # refused before any merge


def test_pipeline_experts_are_found_and_checked_before_loading(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bernini_core import loaders
    from bernini_core.denoise import Experts
    from bernini_core.pipeline import RendererPipeline
    from bernini_core.runtime import ModelHandle

    dit = make_dit()
    before = snapshot(dit)
    state, expected = low_rank(dit, "peft", ("q", "time_proj"), alpha=4.0)
    path = write(tmp_path / "l.safetensors", state)
    one_expert = SimpleNamespace(components=None, experts=Experts(ModelHandle("dit_high", dit, torch.device("cpu")),
                                                                  None, 0.0))  # a 1.3B pipeline's shape
    with pytest.raises(BerniniError, match="low-noise expert.*one expert"):
        apply_loras_(one_expert, [f"{path}:1:low"])
    apply_loras_(one_expert, [f"{path}:0.3:high"])
    assert_only_changed(dit, before, expected, 0.3)

    monkeypatch.setattr(loaders, "load_renderer", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(BerniniError, match="does not exist"):
        RendererPipeline.from_pretrained(tmp_path, device="cpu", loras=[str(tmp_path / "gone.safetensors")])
    with pytest.raises(BerniniError, match="parts= leaves them out"):
        RendererPipeline.from_pretrained(tmp_path, device="cpu", loras=[path], parts=["vae"])


def test_fp8_expert_stays_fp8_and_dequantises_to_the_patched_weight(tmp_path):
    from bernini_core.quant import fp8_ops
    from bernini_core.tiny import quantize_fp8_scaled

    dit = make_dit(ops=fp8_ops())
    layer = dit.blocks[0].attn1.to_q
    dense = layer.weight.detach().clone()
    fp8, scale = quantize_fp8_scaled(dense)
    layer.weight = torch.nn.Parameter(fp8.clone(), requires_grad=False)  # merged in place
    layer.scale_weight.copy_(scale)
    state, expected = low_rank(dit, "comfy", ("q",), rank=2, alpha=2.0)
    apply_loras_(dit, [LoraSpec(write(tmp_path / "l.safetensors", state), 0.8)])

    assert layer.weight.dtype == torch.float8_e4m3fn
    want = fp8.float() * scale + 0.8 * expected["blocks.0.attn1.to_q.weight"]
    new_scale = layer.scale_weight.float()
    assert math.isclose(new_scale.item(), want.abs().max().item() / 448, rel_tol=1e-6)  # a fresh per-tensor scale
    got = layer.weight.float() * new_scale
    # e4m3: 3 mantissa bits -> rounding error at most 1/16 of the value (normals), half a subnormal step below
    assert bool(((got - want).abs() <= want.abs() / 16 + new_scale * 2 ** -10 + 1e-7).all())
    assert (got - want).abs().max() > 0  # it really went through fp8
    out = layer(torch.randn(3, 48))  # still a working fp8 layer
    assert torch.isfinite(out).all()


class PackedLinear(torch.nn.Module):
    """A GGUF-like layer: packed uint8 weight bytes, the logical shape, and ComfyUI's weight_function list."""

    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self.weight_shape = (out_features, in_features)
        self.weight_function = []


def test_quantised_layer_gets_a_weight_function(tmp_path):
    dit = make_dit()
    state, expected = low_rank(dit, "comfy", ("q",), rank=2, alpha=4.0)
    dit.blocks[0].attn1.to_q = PackedLinear(48, 48)
    packed = dit.blocks[0].attn1.to_q.weight.clone()
    state["diffusion_model.blocks.0.self_attn.q.diff_b"] = diff_b = torch.randn(48)
    apply_loras_(dit, [LoraSpec(write(tmp_path / "l.safetensors", state), 0.6)])

    layer = dit.blocks[0].attn1.to_q
    assert torch.equal(layer.weight, packed) and len(layer.weight_function) == 1  # bytes untouched
    dense = torch.randn(48, 48).to(torch.bfloat16)
    patched = layer.weight_function[0](dense)
    want = (dense.float() + 0.6 * expected["blocks.0.attn1.to_q.weight"]).to(torch.bfloat16)
    assert patched.dtype == torch.bfloat16 and torch.equal(patched, want)
    torch.testing.assert_close(layer.bias, 0.6 * diff_b)  # the float bias is merged as usual


def test_dora_as_comfyui_decomposes_the_weight(tmp_path):
    dit = make_dit()
    before = snapshot(dit)
    state, expected = low_rank(dit, "comfy", ("q",), rank=2, alpha=1.0)
    scale = torch.rand(1, 48) + 0.5  # LyCORIS DoRA: one magnitude per input column
    state["diffusion_model.blocks.0.self_attn.q.dora_scale"] = scale
    apply_loras_(dit, [LoraSpec(write(tmp_path / "l.safetensors", state), 0.5)])
    w = before["blocks.0.attn1.to_q.weight"]
    merged = w + expected["blocks.0.attn1.to_q.weight"]
    column_norm = merged.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps
    want = w + 0.5 * (merged * scale / column_norm - w)
    torch.testing.assert_close(dit.blocks[0].attn1.to_q.weight, want, rtol=1e-5, atol=1e-6)


def test_no_matching_key_is_an_error_naming_keys(tmp_path):
    dit = make_dit()
    state = {f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": torch.zeros(2, 8) for i in range(7)}
    state.update({k.replace("down", "up"): torch.zeros(8, 2) for k in list(state)})
    with pytest.raises(BerniniError) as err:
        lora_patches(write(tmp_path / "sdxl.safetensors", state), dit)
    message = str(err.value)
    assert "matches no parameter" in message and "lora_te_text_model_encoder_layers_0_mlp_fc1" in message
    assert "kohya" in message and "diffusers" in message  # the accepted layouts


def test_partly_matching_keys_are_one_warning_line(tmp_path, caplog):
    dit = make_dit()
    before = snapshot(dit)
    state, expected = low_rank(dit, "comfy", ("q", "o2"), alpha=2.0)
    state["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(48, 3)  # Wan2.1 I2V only
    state["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(3, 48)
    state["diffusion_model.blocks.7.self_attn.q.diff_b"] = torch.zeros(48)  # a block the tiny model lacks
    with caplog.at_level(logging.WARNING, logger="bernini.lora"):
        apply_loras_({"high": dit, "low": make_dit(1)}, [LoraSpec(write(tmp_path / "p.safetensors", state))])
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "3 of 9 keys matched nothing" in lines[0] and "k_img" in lines[0]
    assert_only_changed(dit, before, expected)


def test_wrong_size_names_key_and_shapes(tmp_path):
    dit = make_dit()
    state = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 2),
             "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64)}
    with pytest.raises(BerniniError, match=r"self_attn\.q\.lora_up\.weight.*\[64, 2\].*\[48, 48\].*A14B / 1\.3B"):
        apply_loras_(dit, [write(tmp_path / "big.safetensors", state)])
    state = {"diffusion_model.blocks.0.norm3.diff": torch.zeros(64)}
    with pytest.raises(BerniniError, match=r"norm3\.diff.*\[64\].*blocks\.0\.norm2\.weight"):
        lora_patches(write(tmp_path / "big_norm.safetensors", state), dit)


def test_unsupported_adapters_and_files_are_named(tmp_path):
    dit = make_dit()
    loha = {"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(48, 2)}
    with pytest.raises(BerniniError, match="LoHa.*ComfyUI"):
        lora_patches(write(tmp_path / "loha.safetensors", loha), dit)
    model = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "head.head.weight": torch.zeros(4, 4)}
    with pytest.raises(BerniniError, match="holds no LoRA weights.*blocks.0.self_attn.q.weight"):
        read_lora(write(tmp_path / "model.safetensors", model))
    (tmp_path / "x.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(BerniniError, match="pickle"):
        read_lora(tmp_path / "x.pt")
    with pytest.raises(BerniniError, match="folder"):
        read_lora(tmp_path)
    incomplete = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, 2)}
    with pytest.raises(BerniniError, match="lora_down.weight' beside it"):
        lora_patches(write(tmp_path / "half.safetensors", incomplete), dit)


def test_module_map_for_comfyui_loader(tmp_path):
    dit = make_dit()
    names = [n for n, _ in dit.named_parameters()]
    keys = [base_name(layout, m) + LAYOUTS[layout][1] for layout in LAYOUTS for m in MODULES]
    keys += ["diffusion_model.blocks.0.diff_m", "diffusion_model.head.diff_m", "transformer.proj_out.lora_B.bias",
             "diffusion_model.blocks.0.self_attn.q.alpha", "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight",
             "text_encoders.x.lora_up.weight", "random_key"]
    mapping, unmatched = lora_module_map(keys, names)
    for layout in LAYOUTS:
        base = canonical_state_dict({base_name(layout, "q"): None})
        assert mapping[next(iter(base))] == "blocks.0.attn1.to_q.weight"
        assert mapping[canonical_state_dict({base_name(layout, "norm"): None}).popitem()[0]] == "blocks.0.norm2.weight"
        assert mapping[canonical_state_dict({base_name(layout, "patch"): None}).popitem()[0]] == "patch_embedding.weight"
    assert mapping["diffusion_model.blocks.0.modulation"] == "blocks.0.scale_shift_table"  # .diff_m, renamed
    assert mapping["diffusion_model.head.modulation"] == "scale_shift_table"
    assert mapping["transformer.proj_out"] == "proj_out.weight"  # its lora_B.bias is a .diff_b
    assert sorted(unmatched) == ["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight", "random_key",
                                 "text_encoders.x.lora_up.weight"]
    renamed = canonical_state_dict({"diffusion_model.blocks.0.diff_m": 1, "transformer.proj_out.lora_B.bias": 2,
                                    "lora_unet__blocks_0_ffn_0.alpha": 3})
    assert renamed == {"diffusion_model.blocks.0.modulation.diff": 1, "transformer.proj_out.diff_b": 2,
                       "lora_unet_blocks_0_ffn_0.alpha": 3}


def test_lora_flag_parsing(tmp_path):
    lora = tmp_path / "a.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(48)}, str(lora))
    assert parse_lora_arg(str(lora)) == LoraSpec(str(lora), 1.0, "both")
    assert parse_lora_arg(f"{lora}:0.5") == LoraSpec(str(lora), 0.5, "both")
    assert parse_lora_arg(f"{lora}:-1.5:LOW") == LoraSpec(str(lora), -1.5, "low")
    assert parse_lora_arg(f"{lora}:high") == LoraSpec(str(lora), 1.0, "high")
    colon = tmp_path / "v2:final.safetensors"  # a ':' in the path: read from the right
    colon.write_bytes(lora.read_bytes())
    assert parse_lora_arg(f"{colon}:0.25:high") == LoraSpec(str(colon), 0.25, "high")
    assert parse_lora_arg(str(colon)).path == str(colon)
    for text, fragment in [(f"{lora}:0.5:middle", "'middle' is neither a strength"),
                           (f"{lora}:lots", "'lots' is neither a strength"),
                           (f"{lora}:nan", "finite"), (f"{lora}:inf:high", "finite"),
                           (str(tmp_path / "missing.safetensors") + ":0.5", "missing.safetensors' does not exist"),
                           (str(tmp_path), "is a folder"), ("", r"FILE\[:STRENGTH")]:
        with pytest.raises(BerniniError, match=fragment):
            parse_lora_arg(text)
    for bad in (dict(strength=float("nan")), dict(strength="1"), dict(expert="mid")):
        with pytest.raises(BerniniError):
            LoraSpec(str(lora), **bad)


def test_cli_refuses_bad_lora_before_loading(tiny_renderer_dir, tmp_path, capsys, monkeypatch):
    from bernini_core.cli import main
    from bernini_core.pipeline import BerniniPipeline

    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    model = write(tmp_path / "model.safetensors", {"blocks.0.self_attn.q.weight": torch.zeros(2, 2)})
    base = ["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2i", "--prompt", "a fox",
            "--height", "32", "--width", "32", "--device", "cpu", "--output", str(tmp_path / "o.png")]
    for flag, fragment in [(f"{model}:1:sideways", "'sideways' is neither"),
                           (str(tmp_path / "nope.safetensors"), "does not exist"),
                           (model, "holds no LoRA weights")]:
        assert main(base + ["--lora", flag]) == 2
        assert fragment in capsys.readouterr().err


def test_cli_merges_loras_into_the_experts(tiny_renderer_dir, tmp_path, capsys):
    """--lora at strength 1 changes the output; at strength 0 it equals no LoRA, bit for bit."""
    from bernini_core.cli import main

    dit = make_dit()  # same architecture as the tiny renderer's experts
    state, _ = low_rank(dit, "comfy", ("head", "q", "ffn"), rank=2, alpha=2.0)
    high = write(tmp_path / "high.safetensors", {k: v * 20 for k, v in state.items()})
    low = write(tmp_path / "low.safetensors", low_rank(dit, "kohya", ("head",), seed=7)[0])
    base = ["generate", "--config", str(tiny_renderer_dir), "--task_type", "t2i", "--prompt", "a fox", "--height",
            "32", "--width", "32", "--num_inference_steps", "1", "--device", "cpu", "--quiet", "--overwrite",
            "--output", str(tmp_path / "o.png")]

    def latents(*flags, name):
        path = tmp_path / f"{name}.safetensors"
        assert main(base + ["--save_latents", str(path), *flags]) == 0
        return next(iter(load_file(str(path)).values()))

    plain = latents(name="plain")
    merged = latents("--lora", f"{high}:1:high", "--lora", f"{low}:0.5:low", name="merged")
    off = latents("--lora", f"{high}:0", "--lora", f"{low}:0:low", name="off")
    assert not torch.equal(plain, merged) and (plain - merged).abs().max() > 1e-3
    assert torch.equal(plain, off)
    capsys.readouterr()
