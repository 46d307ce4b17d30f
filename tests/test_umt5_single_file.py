"""UMT5TextEncoder.from_single_file: ComfyUI's one-file UMT5-XXL text encoders (docs/wan_qwen.md §3).

ComfyUI keeps UMT5 as one safetensors file with transformers key names, the SentencePiece model embedded as
a uint8 ``spiece_model`` tensor and, in the fp8 "scaled" variant, fp8 Linear weights with a per-tensor
``scale_weight`` plus a ``scaled_fp8`` marker (ComfyUI comfy/text_encoders/wan.py, sd3_clip.t5_xxl_detect,
comfy/utils.py convert_old_quants). Here a tiny random UMT5 is written in that layout and compared with
transformers' own loader (UMT5TextEncoder.from_pretrained on the same weights in the transformers layout),
and the token ids with a T5Tokenizer and a plain SentencePieceProcessor built from the same model bytes.
"""

import io
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from bernini_core.errors import BerniniError
from bernini_core.text_encoder import UMT5TextEncoder

SENTENCES = [
    "A cat walks slowly across the street at night.",
    "The camera moves into the red room and the light changes.",
    "一只猫在街上慢慢地走，镜头缓缓推进。",
    "Ein Hund läuft über die grüne Wiese.",
    "Replace the sky with a sunset, keep the city unchanged.",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止",
    "Add a blue car; remove the tree! 123 456 789",
]
TEXTS = [
    "A cat walks across the red room.",
    "一只狗在街上走",
    "  spaced   out\ttext  with ünïcödé and Ωmega ",
    "You are a helpful assistant specialized in video editing.Replace the car.",
]
SHORT_LENGTH = 64
EXTRA_ROWS = 384  # like umt5-xxl: 256,000 pieces + 300 sentinels inside 256,384 embedding rows
TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3)
LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
           "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


# --------------------------------------------------------------------------- helpers

def train_spiece() -> bytes:
    """A tiny T5-style SentencePiece unigram model (pad 0, eos 1, unk 2, no bos), trained offline."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buffer, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return buffer.getvalue()


def tiny_state(vocab: int, seed: int = 0) -> dict:
    """Seeded bf16 UMT5 encoder weights with transformers names (norms and biases random too)."""
    d, inner, heads, d_ff = TINY["d_model"], TINY["num_heads"] * TINY["d_kv"], TINY["num_heads"], TINY["d_ff"]
    shapes = {"shared.weight": (vocab, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(TINY["num_layers"]):
        block = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            shapes[f"{block}.0.SelfAttention.{name}.weight"] = (inner, d)
        shapes[f"{block}.0.SelfAttention.o.weight"] = (d, inner)
        shapes[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = (32, heads)
        shapes[f"{block}.0.layer_norm.weight"] = (d,)
        shapes[f"{block}.1.DenseReluDense.wi_0.weight"] = (d_ff, d)
        shapes[f"{block}.1.DenseReluDense.wi_1.weight"] = (d_ff, d)
        shapes[f"{block}.1.DenseReluDense.wo.weight"] = (d, d_ff)
        shapes[f"{block}.1.layer_norm.weight"] = (d,)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator)
        if "norm" in name:
            value = 1.0 + 0.1 * noise
        elif "relative_attention_bias" in name or name == "shared.weight":
            value = noise * (0.5 if name == "shared.weight" else 0.3)
        else:
            value = noise / math.sqrt(shapes[name][1])
        state[name] = value.to(torch.bfloat16)
    return state


def is_block_linear(name: str) -> bool:
    return name.startswith("encoder.block.") and name.endswith(tuple(f"{n}.weight" for n in LINEARS))


def quantize(tensor: torch.Tensor):
    """Per-tensor e4m3fn quantisation as ComfyUI's scaled files: (fp8, fp32 scale = amax / 448)."""
    value = tensor.float()
    scale = value.abs().amax() / 448.0
    return (value / scale).to(torch.float8_e4m3fn), scale


def spiece_tensor(model_bytes: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)


def write_transformers_folder(folder, state: dict, vocab: int, model_bytes: bytes, dtype=torch.bfloat16):
    """The transformers layout (config.json + model.safetensors) and a tokenizer folder (spiece.model)."""
    from transformers import UMT5Config

    model_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    model_dir.mkdir(parents=True)
    tok_dir.mkdir(parents=True)
    UMT5Config(vocab_size=vocab, relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", **TINY).to_json_file(str(model_dir / "config.json"))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (tok_dir / "spiece.model").write_bytes(model_bytes)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 300, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>"}))
    return model_dir, tok_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("umt5_single")
    model_bytes = train_spiece()
    pieces = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    vocab = pieces + EXTRA_ROWS
    state = tiny_state(vocab)
    a = {"root": root, "spiece": model_bytes, "pieces": pieces, "vocab": vocab, "state": state}

    # ComfyUI umt5_xxl_fp16 / bf16 style: transformers names + embedded tokenizer.
    for tag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        path = root / f"umt5_tiny_{tag}.safetensors"
        save_file({**{k: v.to(dtype) for k, v in state.items()}, "spiece_model": spiece_tensor(model_bytes)},
                  str(path))
        a[tag] = path

    # Old "scaled" fp8: fp8 block Linears + scale_weight (+ a scale_input of 1), a scaled_fp8 marker.
    scaled, new_style, dequantized = {}, {}, {}
    for name, value in state.items():
        if is_block_linear(name):
            weight, scale = quantize(value)
            layer = name[: -len(".weight")]
            scaled.update({name: weight, f"{layer}.scale_weight": scale, f"{layer}.scale_input": torch.ones(())})
            tag = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
            new_style.update({name: weight, f"{layer}.weight_scale": scale, f"{layer}.comfy_quant": tag})
            dequantized[name] = (weight.float() * scale).to(torch.bfloat16)
        else:
            scaled[name] = new_style[name] = dequantized[name] = value
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for tag, tensors in (("fp8_scaled", scaled), ("fp8_comfy_quant", new_style)):
        path = root / f"umt5_tiny_{tag}.safetensors"
        save_file({**tensors, "spiece_model": spiece_tensor(model_bytes)}, str(path))
        a[tag] = path

    a["reference"] = write_transformers_folder(root / "ref_bf16", state, vocab, model_bytes)
    a["reference_fp16"] = write_transformers_folder(root / "ref_fp16", state, vocab, model_bytes, torch.float16)
    a["reference_fp8"] = write_transformers_folder(root / "ref_fp8", dequantized, vocab, model_bytes)
    return a


def short(encoder: UMT5TextEncoder) -> UMT5TextEncoder:
    """Pad to 64 instead of 512 tokens: the same comparison at an eighth of the CPU time."""
    encoder.max_length = SHORT_LENGTH
    return encoder


def encodings_equal(encoder_a, encoder_b, texts=TEXTS):
    out_a, out_b = short(encoder_a).encode(texts), short(encoder_b).encode(texts)
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(out_a, out_b))


# --------------------------------------------------------------------------- weights

@pytest.mark.parametrize("file_tag, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp16", torch.float32)])
def test_single_file_equals_from_pretrained(assets, file_tag, dtype):
    folder = assets["reference"] if file_tag == "bf16" else assets["reference_fp16"]
    reference = UMT5TextEncoder.from_pretrained(*folder, dtype=dtype)
    loaded = UMT5TextEncoder.from_single_file(assets[file_tag], dtype=dtype)

    ref_params = dict(reference.model.named_parameters())
    got_params = dict(loaded.model.named_parameters())
    assert ref_params.keys() == got_params.keys()
    for name, value in ref_params.items():  # same dtypes (fp16 keeps "wo" in fp32, as transformers does)
        assert got_params[name].dtype == value.dtype, name
        assert torch.equal(got_params[name], value), name
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert encodings_equal(loaded, reference)


@pytest.mark.parametrize("file_tag", ["fp8_scaled", "fp8_comfy_quant"])
def test_fp8_scaled_file(assets, file_tag):
    loaded = UMT5TextEncoder.from_single_file(assets[file_tag], dtype=torch.bfloat16)
    # Exactly the transformers model of the dequantised weights (fp8 * scale) ...
    dequantized = UMT5TextEncoder.from_pretrained(*assets["reference_fp8"], dtype=torch.bfloat16)
    assert encodings_equal(loaded, dequantized)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    # ... so every weight is the bf16 original within e4m3 rounding (3 mantissa bits: at most 1/16 relative;
    # subnormals: half a step of scale * 2**-9), plus bf16 rounding of the result.
    params = dict(loaded.model.named_parameters())
    for name, value in assets["state"].items():
        original, got = value.float(), params[name].float()
        if is_block_linear(name):
            scale = original.abs().amax() / 448.0
            bound = torch.maximum(original.abs() / 16, scale * 2.0 ** -10) * 1.01 + original.abs() * 2.0 ** -8
            assert (got - original).abs().le(bound).all(), name
            assert not torch.equal(got, original), name  # really quantised
        else:
            assert torch.equal(got, original), name  # norms, embedding, position bias stay bf16
    # End to end the tiny random model amplifies the ~2.7 % weight error (T5 logits are unscaled): measured
    # 0.139 and 0.236 relative output error for the two texts, against ~1.4 for unrelated weights. That is the
    # quantisation itself (the same model run in fp32 gives 0.138 / 0.235 on every CPU); bf16 kernels (threads
    # 1-4, ATEN_CPU_CAPABILITY default/avx2/avx512) and transformers 4.57 vs 5.x move it by at most 0.006.
    original = short(UMT5TextEncoder.from_pretrained(*assets["reference"], dtype=torch.bfloat16))
    for got, ref in zip(loaded.encode(TEXTS[:2]), original.encode(TEXTS[:2])):
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert 0 < err < 0.3, err


def test_config_read_from_shapes(assets):
    config = UMT5TextEncoder.from_single_file(assets["bf16"]).model.config
    assert (config.vocab_size, config.d_model, config.d_kv, config.num_heads, config.d_ff, config.num_layers) == \
        (assets["vocab"], TINY["d_model"], TINY["d_kv"], TINY["num_heads"], TINY["d_ff"], TINY["num_layers"])
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (32, 128)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"


def test_umt5_xxl_config_from_shapes():
    """The real file's shapes give the umt5-xxl config (docs/wan_qwen.md §3: 5,680,910,336 parameters)."""
    from transformers import UMT5EncoderModel

    from bernini_core.text_encoder import _umt5_config_from_shapes

    shapes = {"shared.weight": (256384, 4096), "encoder.final_layer_norm.weight": (4096,)}
    for i in range(24):
        block = f"encoder.block.{i}.layer."
        shapes[block + "0.SelfAttention.q.weight"] = (4096, 4096)
        shapes[block + "0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
        shapes[block + "1.DenseReluDense.wi_0.weight"] = (10240, 4096)

    class Header:  # a header-only stand-in for TensorSource
        def shape(self, key):
            return shapes[key]

    names = {name: name for name in shapes}
    config = _umt5_config_from_shapes(names, Header(), "umt5_xxl_fp16.safetensors")
    assert (config.vocab_size, config.d_model, config.d_kv, config.num_heads, config.d_ff, config.num_layers,
            config.relative_attention_num_buckets, config.relative_attention_max_distance) == \
        (256384, 4096, 64, 64, 10240, 24, 32, 128)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


def test_wan_original_names_with_tokenizer_dir(assets, tmp_path):
    """Files with the original Wan .pth names (docs/wan_qwen.md §3) and no embedded tokenizer load with
    tokenizer_dir."""
    block_names = {
        "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.0.layer_norm.weight": "norm1.weight", "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight", "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    wan = {}
    for name, value in assets["state"].items():
        if name == "shared.weight":
            wan["token_embedding.weight"] = value
        elif name == "encoder.final_layer_norm.weight":
            wan["norm.weight"] = value
        else:
            _, _, index, rest = name.split(".", 3)
            wan[f"blocks.{index}.{block_names[rest]}"] = value
    path = tmp_path / "umt5-xxl-enc-bf16.safetensors"
    save_file(wan, str(path))
    model_dir, tok_dir = assets["reference"]
    with pytest.raises(BerniniError, match="no embedded tokenizer"):
        UMT5TextEncoder.from_single_file(path)
    loaded = UMT5TextEncoder.from_single_file(path, tokenizer_dir=tok_dir)
    assert encodings_equal(loaded, UMT5TextEncoder.from_pretrained(model_dir, tok_dir))


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_t5_tokenizer_and_sentencepiece(assets, tmp_path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    encoder = UMT5TextEncoder.from_single_file(assets["bf16"])
    (tmp_path / "spiece.model").write_bytes(assets["spiece"])
    reference = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=300, local_files_only=True)
    processor = spm.SentencePieceProcessor(model_proto=assets["spiece"], add_eos=True)  # ComfyUI's tokenizer
    for text in TEXTS + SENTENCES:
        ids, mask = encoder.tokenize(text)
        length = int(mask.sum())
        expected = reference(text).input_ids
        assert ids[0, :length].tolist() == expected
        assert expected == processor.encode(text)  # plain text: the same ids ComfyUI would use
        assert expected[-1] == 1 and ids[0, length:].eq(0).all()  # EOS appended, pad 0
    # The 300 sentinels follow the pieces in reverse order, as in google/umt5-xxl (<extra_id_0> = 256299 there).
    tokenizer = encoder.tokenizer
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == assets["pieces"] + 299
    assert tokenizer.convert_tokens_to_ids("<extra_id_299>") == assets["pieces"]
    assert tokenizer("a <extra_id_0>").input_ids == reference("a <extra_id_0>").input_ids
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


# --------------------------------------------------------------------------- errors

def test_missing_tokenizer_names_where_to_get_one(assets, tmp_path):
    path = tmp_path / "no_tokenizer.safetensors"
    save_file(dict(assets["state"]), str(path))
    with pytest.raises(BerniniError, match="Comfy-Org/Wan_2.1_ComfyUI_repackaged") as info:
        UMT5TextEncoder.from_single_file(path)
    assert "spiece_model" in str(info.value) and "tokenizer_dir" in str(info.value)


def test_not_a_umt5_file(tmp_path):
    from bernini_core.tiny import make_tiny_comfy_files

    dit = make_tiny_comfy_files(tmp_path)["high"]  # a Wan diffusion model given as the text encoder
    with pytest.raises(BerniniError, match="not a UMT5 text encoder"):
        UMT5TextEncoder.from_single_file(dit)
    with pytest.raises(BerniniError, match="one .safetensors file"):
        UMT5TextEncoder.from_single_file(tmp_path)
    with pytest.raises(BerniniError, match="does not exist"):
        UMT5TextEncoder.from_single_file(tmp_path / "missing.safetensors")


def test_t5_with_shared_position_bias_is_refused(assets, tmp_path):
    """t5xxl (Flux / SD3) has one relative-position table in block 0 only; it is not UMT5."""
    state = {k: v for k, v in assets["state"].items()
             if "relative_attention_bias" not in k or k.startswith("encoder.block.0.")}
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file({**state, "spiece_model": spiece_tensor(assets["spiece"])}, str(path))
    with pytest.raises(BerniniError, match="not UMT5-XXL"):
        UMT5TextEncoder.from_single_file(path)


def test_other_quantisations_are_refused(assets, tmp_path):
    state = dict(assets["state"])
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    state[name] = torch.zeros(state[name].shape, dtype=torch.uint8)
    state[name[: -len("weight")] + "comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    path = tmp_path / "umt5_nvfp4.safetensors"
    save_file({**state, "spiece_model": spiece_tensor(assets["spiece"])}, str(path))
    with pytest.raises(BerniniError, match="nvfp4"):
        UMT5TextEncoder.from_single_file(path)
