"""GGUF experts (bernini_core/gguf): torch dequantisation equals gguf-py's numpy bit for bit, a ComfyUI-GGUF-layout
expert loads with its Linear weights still packed and computes what the dequantised weights compute, LoRA-style
weight_function patches apply, and broken or foreign files are refused naming the file."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from bernini_core.errors import BerniniError  # noqa: E402
from bernini_core.gguf import SUPPORTED_TYPE_NAMES, GGUFLinear, dequantize, load_gguf_dit  # noqa: E402
from bernini_core.gguf.dequant import QUANT_TYPES  # noqa: E402
from bernini_core.keymaps.wan_dit import dit_key_from_original  # noqa: E402
from bernini_core.loaders import load_dit_file, load_renderer  # noqa: E402
from bernini_core.renderer.config import DiTConfig  # noqa: E402
from bernini_core.renderer.transformer import BerniniDiT  # noqa: E402

from gguf_files import GGUF_TINY_DIT, Q, quantize, wan_state, write_gguf, write_wan_expert  # noqa: E402

# Types gguf-py can quantise; for the others (the k-quants) random blocks with finite fp16 fields are used.
GGUF_QUANTISES = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"}
# Byte offsets of the fp16 fields (d, dmin, m) inside each block of the k-quants, ggml's block_q*_K structs.
K_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _blocks_for(name: str, rng, rows: int = 4, cols: int = 512) -> np.ndarray:
    qtype = Q[name]
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if name in GGUF_QUANTISES:
        return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset in K_FP16_FIELDS[name]:  # random but finite scales, so the comparison is of numbers, not NaNs
        raw[:, offset:offset + 2] = rng.uniform(-2, 2, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def test_block_sizes_are_ggufs():
    assert set(SUPPORTED_TYPE_NAMES) == {qt.name for qt in QUANT_TYPES.values()}
    for code, qt in QUANT_TYPES.items():
        assert Q[qt.name] == code and gguf.GGML_QUANT_SIZES[Q(code)] == (qt.block_size, qt.type_size)


@pytest.mark.parametrize("name", SUPPORTED_TYPE_NAMES)
def test_torch_dequantisation_equals_gguf_numpy_bit_for_bit(name):
    raw = _blocks_for(name, np.random.default_rng(len(name) * 7 + ord(name[1])))
    expected = gguf.quants.dequantize(raw, Q[name]).astype(np.float32)
    assert expected.shape == (4, 512) and np.isfinite(expected).all()
    ours = dequantize(torch.from_numpy(raw.copy()), Q[name], expected.shape)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert np.array_equal(ours.numpy().view(np.int32), expected.view(np.int32))
    half = dequantize(torch.from_numpy(raw.copy()), Q[name], (2, 1024), torch.bfloat16)  # computed fp32, then cast
    assert torch.equal(half, torch.from_numpy(expected).reshape(2, 1024).to(torch.bfloat16))


# ---------------------------------------------------------------------------- a tiny expert
@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    state = wan_state(seed=3)
    return {"state": state,
            "Q8_0": write_wan_expert(root / "wan_tiny_Q8_0.gguf", state, Q.Q8_0, prefix="model.diffusion_model."),
            "Q4_K": write_wan_expert(root / "wan_tiny_Q4_K.gguf", state, Q.Q4_K, patch_5d=True)}


def _numpy_dequantised_state(path) -> dict:
    """The file's tensors dequantised by gguf-py (not our code), under our names and logical shapes."""
    reader = gguf.GGUFReader(path)
    state = {}
    for tensor in reader.tensors:
        name = dit_key_from_original(tensor.name.removeprefix("model.diffusion_model."))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        field = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
        shape = field.contents() if field is not None else values.shape
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return state


def _forward(model):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 2, 4, 4, generator=generator)
    source = torch.randn(1, 16, 1, 4, 4, generator=generator)
    context = torch.randn(1, 6, GGUF_TINY_DIT["text_dim"], generator=generator)
    return model([source, latent], [1.0, 0.0], torch.tensor([700.0]), context)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_expert_stays_packed_and_matches_the_dequantised_forward(experts, qtype):
    model = load_dit_file(experts[qtype], dtype=torch.float32)  # the single-file entry point dispatches .gguf
    config = DiTConfig.from_dict(GGUF_TINY_DIT)
    assert model.config == config
    packed = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear) and m.bernini_quantized}
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    # every Linear of more than 1024 weights is packed: 8 attention + 2 FFN per block, 5 embedders, the head
    assert len(packed) == 10 * config.num_layers + 6 and "blocks.1.ffn.net.0.proj" in packed
    for layer in packed.values():
        assert layer.weight.dtype == torch.uint8
        assert layer.weight.nbytes == layer.in_features * layer.out_features // block * size  # resident bytes
    assert model.scale_shift_table.dtype == torch.float32 and model.patch_embedding.weight.shape == (256, 16, 1, 2, 2)

    reference = BerniniDiT(config).eval()
    reference.load_state_dict(_numpy_dequantised_state(experts[qtype]))
    with torch.no_grad():
        ours, expected = _forward(model), _forward(reference)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # and the packed weights are the quantised originals, not something else of the right size
    original = experts["state"]["blocks.0.ffn.net.0.proj.weight"]
    error = (packed["blocks.0.ffn.net.0.proj"].dequantized_weight(torch.float32) - original).norm() / original.norm()
    assert error < (0.01 if qtype == "Q8_0" else 0.12)


def test_gguf_experts_through_the_split_loader(experts, tmp_path):
    """The CLI's --high_noise_ckpt/--low_noise_ckpt take .gguf experts (config from the base folder)."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(GGUF_TINY_DIT))
    loaded = load_renderer(tmp_path, high_noise_ckpt=str(experts["Q4_K"]), low_noise_ckpt=str(experts["Q8_0"]),
                           dtype=torch.bfloat16, parts="experts")
    for dit, qtype in ((loaded.dit_high, "Q4_K"), (loaded.dit_low, "Q8_0")):
        layer = dit.blocks[0].attn1.to_q
        assert layer.qtype == Q[qtype] and dit.compute_dtype == torch.bfloat16
        assert dit.blocks[0].norm2.weight.dtype == torch.float32  # fp32 islands kept
        assert dit.condition_embedder.text_embedder.linear_1.bias.dtype == torch.bfloat16


def test_weight_function_patches_apply_in_order_after_dequantisation():
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(8, 256, generator=generator), torch.randn(8, generator=generator)
    raw = quantize(weight.numpy(), Q.Q8_0)
    dequantised = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0))
    layer = GGUFLinear(256, 8, device="meta")
    layer.expect_packed(Q.Q8_0, raw.shape)
    layer.weight = torch.nn.Parameter(torch.from_numpy(raw.copy()), requires_grad=False)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    x = torch.randn(3, 256, generator=generator)
    torch.testing.assert_close(layer(x), F.linear(x, dequantised, bias), rtol=0, atol=0)
    delta = torch.randn(8, 256, generator=generator)
    layer.weight_function = [lambda w: w * 2, lambda w: w + delta]
    torch.testing.assert_close(layer(x), F.linear(x, dequantised * 2 + delta, bias), rtol=0, atol=0)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, torch.from_numpy(raw))  # untouched
    assert layer.bernini_quantized and layer.state_dict()["weight"].nbytes == 8 * 256 // 32 * 34


# ---------------------------------------------------------------------------- refused files
def test_truncated_gguf_is_named(experts, tmp_path):
    data = experts["Q8_0"].read_bytes()
    for cut, expect in ((len(data) - 1000, "tensor '"), (200, "header"), (3, "only 3 bytes"), (0, "empty")):
        path = tmp_path / f"cut_{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(BerniniError, match="truncated|empty") as info:
            load_dit_file(path)
        assert str(path) in str(info.value) and expect in str(info.value)


def test_truncated_tensor_data_says_how_much_is_missing(experts, tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(experts["Q4_K"].read_bytes()[:-777])
    with pytest.raises(BerniniError, match=r"is truncated: tensor '.+' needs bytes up to \d+ .*\(777 missing"):
        load_gguf_dit(path)


def test_unsupported_type_names_tensor_type_and_the_supported_list(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(4, 66), dtype=np.uint8)  # IQ2_XXS: 66 bytes / 256
    path = write_gguf(tmp_path / "iq.gguf", {"blocks.0.self_attn.q.weight": (raw, Q.IQ2_XXS),
                                             "head.modulation": (np.zeros((1, 2, 4), np.float32), Q.F32)})
    with pytest.raises(BerniniError) as info:
        load_dit_file(path)
    message = str(info.value)
    assert str(path) in message and "'blocks.0.self_attn.q.weight' (IQ2_XXS)" in message
    assert ", ".join(SUPPORTED_TYPE_NAMES) in message


@pytest.mark.parametrize("arch, kind", [("flux", "another kind of model"), ("llama", "a text encoder")])
def test_other_architecture_is_named(tmp_path, arch, kind):
    iq2 = np.zeros((4, 66), np.uint8)  # a type we do not read: the architecture is still what is named
    path = write_gguf(tmp_path / f"{arch}.gguf", {"x.weight": (iq2, Q.IQ2_XXS)}, arch=arch)
    with pytest.raises(BerniniError, match=f"holds a '{arch}' model \\({kind}"):
        load_dit_file(path)


def test_not_a_wan_dit(tmp_path):
    tensors = {"blocks.0.self_attn.q.weight": (np.zeros((4, 4), np.float32), Q.F32)}
    with pytest.raises(BerniniError, match="cannot infer the DiT configuration") as info:
        load_dit_file(write_gguf(tmp_path / "wan_but_not.gguf", tensors))
    assert "wan_but_not.gguf" in str(info.value)
    with pytest.raises(BerniniError, match="declares no architecture"):  # sd.cpp-style file with foreign names
        load_dit_file(write_gguf(tmp_path / "none.gguf", {"x.weight": tensors.popitem()[1]}, arch=None))


def test_safetensors_renamed_gguf(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.gguf"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(BerniniError, match="is not a GGUF file \\(a safetensors file"):
        load_dit_file(path)
