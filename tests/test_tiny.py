"""Tiny random checkpoints (bernini_core.tiny): reproducible bytes, official layouts loadable by diffusers /
transformers, shape tables equal to the reference classes."""

import json

import pytest
import torch

from bernini_core import tiny

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel  # noqa: E402
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_everything(root, seed):
    tiny.make_tiny_renderer(root / "renderer", seed=seed)
    tiny.make_tiny_renderer(root / "renderer_1p3b", variant="1.3b", seed=seed)
    tiny.make_tiny_split(root / "split", seed=seed)
    tiny.make_tiny_comfy_files(root / "comfy", seed=seed)
    return all_files(root)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_seed0")
    return root, make_everything(root, 0)


def test_same_seed_same_bytes_other_seed_other_weights(made, tmp_path):
    _, first = made
    again = make_everything(tmp_path / "again", 0)
    assert first.keys() == again.keys()
    assert all(first[name] == again[name] for name in first)
    other = make_everything(tmp_path / "other", 1)
    assert other.keys() == first.keys()
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) >= 15
    assert all(first[name] != other[name] for name in weights)
    assert sum(len(b) for b in first.values()) < 5 * 1024 * 1024


def test_renderer_folder_loads_in_diffusers_and_transformers(made):
    root = made[0] / "renderer"
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "bernini_renderer" and config["switch_dit_boundary"] == 0.875
    assert config["skip_transformer_2"] is False and config["shift"] == 3.0
    assert config["use_unipc"] is True and config["use_src_id_rotary_emb"] is True
    assert config["max_sequence_length"] == 512
    assert sorted(p.name for p in (root / "transformer").glob("*.safetensors")) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]

    for sub, expert in (("transformer", "high"), ("transformer_2", "low")):
        model, info = WanTransformer3DModel.from_pretrained(root / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        expected = tiny.tiny_dit_state_dict(expert=expert)
        for key, value in model.state_dict().items():
            assert torch.equal(value.to(torch.bfloat16), expected[key]), key

    vae, info = AutoencoderKLWan.from_pretrained(root / "vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert vae.config.z_dim == 16 and vae.config.temperal_downsample == [False, True, True]
    with torch.no_grad():
        video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
        latents = vae.encode(video).latent_dist.mode()
        assert latents.shape == (1, 16, 2, 2, 2)
        assert torch.isfinite(vae.decode(latents).sample).all()

    encoder, info = UMT5EncoderModel.from_pretrained(root / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert encoder.config.d_model == tiny.TINY_DIT["text_dim"]
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    batch = tokenizer("a cat walks on the street", padding="max_length", max_length=16, truncation=True,
                      return_tensors="pt")
    ids = batch.input_ids[0].tolist()
    assert ids[:7] == [tokenizer.convert_tokens_to_ids(t) for t in
                       ["\u2581a", "\u2581cat", "\u2581walks", "\u2581on", "\u2581the", "\u2581street", "</s>"]]
    assert ids[6] == 1 and ids[7:] == [0] * 9 and batch.attention_mask[0].sum() == 7
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.unk_token_id == 2
    assert tokenizer("\u8272\u8c03").input_ids[-2] == 2  # characters outside the vocabulary -> <unk>
    assert len(tokenizer) == encoder.config.vocab_size
    with torch.no_grad():
        hidden = encoder(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert hidden.shape == (1, 16, 32) and torch.isfinite(hidden).all()

    scheduler = UniPCMultistepScheduler.from_pretrained(root / "scheduler")
    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    assert scheduler.config.flow_shift == 3.0
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == 999


def test_1p3b_variant_has_one_expert(made):
    root = made[0] / "renderer_1p3b"
    config = json.loads((root / "config.json").read_text())
    assert config["skip_transformer_2"] is True and config["switch_dit_boundary"] == 0
    assert not (root / "transformer_2").exists() and (root / "transformer").is_dir()


def test_split_release_and_wan_base(made):
    root = made[0] / "split"
    for which, prefix in (("high", "diff_dec.transformer."), ("low", "diff_dec.transformer_2.")):
        index = json.loads((root / f"bernini_renderer_{which}" / "model.safetensors.index.json").read_text())
        keys = set(index["weight_map"])
        assert len(set(index["weight_map"].values())) == 2
        assert sum(k.startswith(prefix) for k in keys) == len(tiny.dit_shapes(tiny.TINY_DIT))
        assert any(k.startswith("t5_text_encoder.") for k in keys)
        assert any(k.startswith("ema.") for k in keys) == (which == "high")
    base = root / tiny.WAN_BASE_DIRNAME
    model_index = json.loads((base / "model_index.json").read_text())
    assert model_index["_class_name"] == "WanPipeline" and model_index["boundary_ratio"] == 0.875
    assert WanTransformer3DModel.load_config(base / "transformer")["num_layers"] == 2
    UMT5EncoderModel.from_pretrained(base / "text_encoder")
    AutoTokenizer.from_pretrained(base / "tokenizer")
    AutoencoderKLWan.from_pretrained(base / "vae")
    UniPCMultistepScheduler.from_pretrained(base / "scheduler")


def test_comfy_files(made):
    from safetensors import safe_open

    root = made[0] / "comfy"
    with safe_open(str(root / "bernini_r_low_noise_tiny_fp8_e4m3fn_scaled.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "scaled_fp8" in keys and "blocks.0.self_attn.q.scale_weight" in keys
        q = f.get_tensor("blocks.0.self_attn.q.weight")
        scale = f.get_tensor("blocks.0.self_attn.q.scale_weight")
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.dim() == 0
        assert f.get_tensor("head.modulation").dtype == torch.bfloat16
        original = tiny.tiny_dit_state_dict(expert="low")["blocks.0.attn1.to_q.weight"].float()
        assert torch.allclose(q.float() * scale, original, rtol=0.07, atol=1e-3 * original.abs().max())
    with safe_open(str(root / "bernini_r_high_noise_tiny_bf16.safetensors"), "pt") as f:
        assert "head.modulation" in f.keys() and "blocks.1.norm3.weight" in f.keys()
    from bernini_core.keymaps.wan_vae import convert_vae_state_dict
    from safetensors.torch import load_file

    vae = convert_vae_state_dict(load_file(str(root / "wan_2.1_vae_tiny.safetensors")))
    expected = tiny.tiny_vae_state_dict()
    assert vae.keys() == expected.keys() and all(torch.equal(vae[k], expected[k]) for k in expected)


def meta_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_shape_tables_match_reference_classes():
    with torch.device("meta"):
        dit = WanTransformer3DModel(**{k: v for k, v in tiny.TINY_DIT.items() if not k.startswith("_")})
        full_dit = WanTransformer3DModel()  # the stock A14B config
        vae = AutoencoderKLWan(**{k: v for k, v in tiny.TINY_VAE.items() if not k.startswith("_")})
        full_vae = AutoencoderKLWan()  # the stock Wan 2.1 VAE
        umt5 = UMT5EncoderModel(UMT5Config(**{k: v for k, v in tiny.TINY_UMT5.items() if k != "architectures"}))
    assert tiny.dit_shapes(tiny.TINY_DIT) == meta_shapes(dit)
    assert tiny.dit_shapes(dict(full_dit.config)) == meta_shapes(full_dit)
    assert tiny.vae_shapes(tiny.TINY_VAE) == meta_shapes(vae)
    assert tiny.vae_shapes(dict(full_vae.config)) == meta_shapes(full_vae)
    assert len(tiny.vae_shapes(dict(full_vae.config))) == 194  # docs/wan_qwen.md §2
    reference = meta_shapes(umt5)
    assert reference.pop("encoder.embed_tokens.weight") == reference["shared.weight"]  # tied, stored once
    assert tiny.umt5_shapes(tiny.TINY_UMT5) == reference
