"""Full Bernini loading (bernini_core.loaders_full) and the tiny Bernini-Diffusers(-v2) layouts (tiny_full).

References: the raw safetensors read directly (json index + safe_open), transformers' own
Qwen2_5_VLForConditionalGeneration.from_pretrained on the original-layout ``mllm.`` tensors, a freshly
built Qwen model for the rotary buffers, and the tensor counts / dtypes of docs/official_behaviour.md §2.1 and §7.3.
"""

import json
import shutil

import pytest
import torch

from bernini_core.checkpoints import Layout, detect_layout
from bernini_core.errors import BerniniError
from bernini_core.loaders_full import (
    CLI_OVERRIDES, COMPONENT_PREFIXES, BerniniConfig, check_target_tokens, detect_version, is_full_bernini_dir,
    load_full, qwen_key_map, split_combined_checkpoint,
)
from bernini_core.tiny import TINY_DIT, TINY_UMT5, dit_shapes
from bernini_core.tiny_full import (
    COMBINED_SHARDS, TINY_FULL_DIT, TINY_NUM_MASK_TOKEN, connector_shapes, make_tiny_bernini, qwen_shapes,
    vit_decoder_shapes,
)

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# Every config.json field of Bernini-Diffusers (docs/official_behaviour.md §2.1).
SPEC_FIELDS = (
    "model_type architectures mllm_attn_implementation partial_pretrain_model base_dir vae_subfolder cotrain "
    "boundary_ratio switch_dit_boundary shift logit_mean logit_std mode_scale scratch transformers_version "
    "mllm_subfolder processor_subfolder bernini_ckpt_subfolder scratch_mllm use_src_id_rotary_emb "
    "feature_type_from_stage_one num_mask_token max_sequence_length clip_diff_cfg connector_cfg "
    "mask_ratio_infer_cfg t5_max_sequence_length t5_text_encoder_subfolder t5_tokenizer_subfolder "
    "t5_combine_type target_fps").split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_bernini(tmp_path_factory.mktemp("full") / "Bernini-Diffusers", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_root):
    return load_full(tiny_root, dtype=torch.bfloat16)


def raw_checkpoint(root):
    """{stored key: tensor} of bernini/, read straight from the index and the shard files."""
    index = json.loads((root / "bernini" / "model.safetensors.index.json").read_text())
    tensors = {}
    for key, shard in index["weight_map"].items():
        with safe_open(str(root / "bernini" / shard), framework="pt") as handle:
            tensors[key] = handle.get_tensor(key)
    return tensors


def under(raw, prefix):
    return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}


def copy_without(src, dst, *skip):
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if n in skip])
    return dst


# ---------------------------------------------------------------------------- tiny layout
def test_tiny_layout_matches_the_release(tiny_root):
    config = json.loads((tiny_root / "config.json").read_text())
    assert set(SPEC_FIELDS) <= set(config) and config["model_type"] == "bernini"
    assert config["num_mask_token"] == TINY_NUM_MASK_TOKEN
    for name in ("bernini", "mllm", "t5_text_encoder", "t5_tokenizer", "vae", "scheduler"):
        assert (tiny_root / name).is_dir(), name
    for name in ("transformer_config.json", "transformer_2_config.json"):
        dit = json.loads((tiny_root / name).read_text())
        assert dit["attention_head_dim"] == 128 and dit["text_dim"] == TINY_UMT5["d_model"]
        assert dit["text_dim"] == config["connector_cfg"]["out_dim_for_gen"]
    shards = sorted(p.name for p in (tiny_root / "bernini").glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{COMBINED_SHARDS:05d}.safetensors" for i in range(1, COMBINED_SHARDS + 1)]
    assert COMBINED_SHARDS >= 2
    raw = raw_checkpoint(tiny_root)
    assert all(t.dtype == torch.float32 for t in raw.values())
    assert not any(k.startswith("ema.") for k in raw)
    prefixes = [p for p in COMPONENT_PREFIXES.values() if p != "mask_tokens"]
    assert all(k == "mask_tokens" or k.startswith(tuple(prefixes)) for k in raw)
    # Tensor counts of the tiny modules by the docs/official_behaviour.md §2.1 composition rules.
    assert len(under(raw, "diff_dec.transformer.")) == len(under(raw, "diff_dec_low.transformer_2.")) == 15 + 27 * 2
    assert len(under(raw, "connector.")) == 12 and len(under(raw, "vit_decoder.")) == 8 + 8 * 2 + 4
    assert len(under(raw, "t5_text_encoder.")) == 10 * TINY_UMT5["num_layers"] + 3
    assert raw["mask_tokens"].shape == (1, TINY_NUM_MASK_TOKEN, config["connector_cfg"]["out_dim_for_vit"])


def test_shape_tables_give_the_release_tensor_counts():
    """At the released sizes the tables reproduce the counts of docs/official_behaviour.md §2.1: 1095 per DiT,
    729 mllm, 140, 12."""
    a14b = dict(TINY_DIT, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096)
    assert len(dit_shapes(a14b)) == 1095
    qwen7b = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
              "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584,
                                "spatial_merge_size": 2, "patch_size": 14, "temporal_patch_size": 2}}
    shapes = qwen_shapes(qwen7b)
    assert sum(k.startswith("visual.") for k in shapes) == 390 and sum(k.startswith("model.") for k in shapes) == 338
    assert shapes["lm_head.weight"] == (152064, 3584) and len(shapes) == 729
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    decoder = vit_decoder_shapes(3584, 3584, 4096, 16)
    assert len(decoder) == 140 and decoder["net.res_blocks.0.adaLN_modulation.1.weight"] == (12288, 4096)
    assert decoder["net.final_layer.adaLN_modulation.1.weight"] == (8192, 4096)
    assert decoder["net.time_embed.mlp.0.weight"] == (4096, 256)
    connector = connector_shapes(3584, 4096, 3584)
    assert len(connector) == 12 and connector["proj_gen.0.weight"] == (4096, 3584)


def test_same_seed_same_bytes(tmp_path, tiny_root):
    again = make_tiny_bernini(tmp_path / "a" / "Bernini-Diffusers", seed=0)
    files = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((tiny_root / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = make_tiny_bernini(tmp_path / "b" / "Bernini-Diffusers", seed=1)
    for shard in (tiny_root / "bernini").glob("*.safetensors"):
        assert shard.read_bytes() != (other / "bernini" / shard.name).read_bytes()


# ---------------------------------------------------------------------------- splitting
def test_split_views_cover_every_tensor_once(tiny_root):
    views = split_combined_checkpoint(tiny_root)
    raw = raw_checkpoint(tiny_root)
    assert set(views) == {"planner_mllm", "connector", "vit_decoder", "mask_tokens", "dit_high", "dit_low", "t5"}
    for name, view in views.items():
        prefix = COMPONENT_PREFIXES[name]
        expected = ["mask_tokens"] if name == "mask_tokens" else sorted(under(raw, prefix))
        assert sorted(view.keys()) == expected, name
    assert sum(len(v) for v in views.values()) == len(raw)
    # the same views from the bernini/ folder and from its index file; modules straddle shards
    assert sorted(split_combined_checkpoint(tiny_root / "bernini")["dit_low"].keys()) == sorted(views["dit_low"].keys())
    index = tiny_root / "bernini" / "model.safetensors.index.json"
    assert len(split_combined_checkpoint(index)["planner_mllm"]) == len(views["planner_mllm"])
    assert max(len(v.files()) for v in views.values()) >= 2
    key = "blocks.1.attn1.to_q.weight"
    assert torch.equal(views["dit_low"].get(key), raw["diff_dec_low.transformer_2." + key])


def test_missing_prefix_is_named(tmp_path):
    keys = {"diff_dec.transformer.a": 1, "diff_dec_low.transformer_2.a": 1, "mllm.model.norm.weight": 1,
            "t5_text_encoder.shared.weight": 1, "connector.proj_gen.0.weight": 1, "mask_tokens": 1}
    save_file({k: torch.zeros(v) for k, v in keys.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BerniniError, match=r"ViT decoder \('vit_decoder\.\*'\)"):
        split_combined_checkpoint(tmp_path)
    save_file({"diff_dec.transformer.a": torch.zeros(1), "diff_dec.transformer_2.a": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(BerniniError, match="split renderer checkpoint, which has no planner"):
        split_combined_checkpoint(tmp_path)


def test_qwen_key_map_handles_every_transformers_layout():
    original = ["visual.blocks.0.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight",
                "lm_head.weight"]
    layouts = [("model.visual.", "model.language_model."),  # transformers >= 4.52 ForConditionalGeneration
               ("visual.", "language_model."),  # Qwen2_5_VLModel (what PlannerModel.build makes)
               ("visual.", "model.")]  # transformers < 4.52 ForConditionalGeneration
    for visual, language in layouts:
        targets = [visual + original[0][7:], language + original[1][6:], language + original[2][6:], "lm_head.weight"]
        mapped = [qwen_key_map(targets)(k) for k in original]
        assert mapped == targets
        assert qwen_key_map(targets, tied_lm_head=True)("lm_head.weight") is None
        assert qwen_key_map(targets[:3])("lm_head.weight") is None  # a module without a head drops it


# ---------------------------------------------------------------------------- loading
def test_every_tensor_equals_its_source_after_the_cast(tiny_root, loaded):
    raw = raw_checkpoint(tiny_root)
    for module, prefix in ((loaded.dit_high, "diff_dec.transformer."), (loaded.dit_low, "diff_dec_low.transformer_2.")):
        source = under(raw, prefix)
        state = module.state_dict()
        assert sorted(state) == sorted(source)
        for key, value in state.items():
            assert value.dtype == torch.bfloat16 and torch.equal(value, source[key].to(torch.bfloat16)), key
    for module, prefix in ((loaded.planner.connector, "connector."), (loaded.planner.vit_decoder, "vit_decoder.")):
        source = under(raw, prefix)
        state = module.state_dict()
        assert sorted(state) == sorted(source)
        assert all(v.dtype == torch.float32 and torch.equal(v, source[k]) for k, v in state.items())
    mask = loaded.planner.mask_tokens
    assert mask.dtype == torch.float32 and torch.equal(mask, raw["mask_tokens"])
    t5 = loaded.text_encoder.model.state_dict()
    for key, value in under(raw, "t5_text_encoder.").items():
        assert t5[key].dtype == torch.bfloat16 and torch.equal(t5[key], value.to(torch.bfloat16)), key


def test_qwen_equals_transformers_own_loading(tiny_root, loaded, tmp_path):
    """transformers' from_pretrained maps the original-layout mllm.* tensors itself: same weights, buffers
    and hidden states as ours."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    shutil.copy(tiny_root / "mllm" / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in under(raw_checkpoint(tiny_root), "mllm.").items()},
              str(tmp_path / "model.safetensors"))
    reference, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tmp_path), output_loading_info=True, local_files_only=True, attn_implementation="sdpa")
    assert not any(info.values()), info
    reference = reference.to(torch.bfloat16).eval()  # official: mllm.to(weight_dtype), buffers included
    ours = loaded.planner.mllm
    expected = {k[len("model."):]: v for k, v in reference.state_dict().items() if k.startswith("model.")}
    state = ours.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k]) for k, v in state.items())
    buffers = dict(reference.model.named_buffers())
    for name, buffer in ours.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, buffers[name]), name
    embeds = torch.randn(1, 7, ours.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours.language_model(inputs_embeds=embeds.bfloat16()).last_hidden_state
        want = reference.model.language_model(inputs_embeds=embeds.bfloat16()).last_hidden_state
    assert torch.equal(got, want)


def test_dtypes_follow_the_official_loaders(loaded):
    """docs/official_behaviour.md §7.3: Qwen, UMT5 and both DiTs entirely bf16 (no fp32 islands); connector / ViT
    decoder / mask_tokens fp32; VAE fp32."""
    assert {p.dtype for p in loaded.planner.mllm.parameters()} == {torch.bfloat16}
    for dit in (loaded.dit_high, loaded.dit_low):
        assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
        assert dit.condition_embedder.time_embedder.linear_1.weight.dtype == torch.bfloat16
        assert dit.scale_shift_table.dtype == torch.bfloat16
    for module in (loaded.planner.connector, loaded.planner.vit_decoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert {p.dtype for p in loaded.text_encoder.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}
    everything = [loaded.planner, loaded.dit_high, loaded.dit_low, loaded.text_encoder.model, loaded.vae]
    assert not any(t.device.type == "meta" for m in everything for t in [*m.parameters(), *m.buffers()])
    assert not any(p.requires_grad for m in everything for p in m.parameters())


def test_components_and_config(loaded, tiny_root):
    config = loaded.config
    assert config.version == "v1" and config.num_mask_token == TINY_NUM_MASK_TOKEN
    assert loaded.dit_high.config.attention_head_dim == 128 and loaded.dit_high.config.text_dim == config.gen_dim
    assert loaded.text_encoder.max_length == 512 and loaded.text_encoder.model.config.d_model == config.gen_dim
    assert loaded.tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert loaded.tokenizer.padding_side == "right" and loaded.processor.image_processor is not None
    ids, mask = loaded.text_encoder.tokenize("a cat walks")
    assert ids.shape == (1, 512) and int(mask.sum()) > 1
    assert loaded.paths.checkpoint == tiny_root / "bernini"
    assert is_full_bernini_dir(tiny_root) and not is_full_bernini_dir(tiny_root / "mllm")
    assert detect_layout(tiny_root) == Layout.BERNINI_FULL


def test_t5_from_the_checkpoint_copy_equals_the_folder(tiny_root, loaded):
    other = load_full(tiny_root, t5_weights="checkpoint")
    folder = loaded.text_encoder.model.state_dict()
    state = other.text_encoder.model.state_dict()
    assert sorted(state) == sorted(folder) and all(torch.equal(v, folder[k]) for k, v in state.items())
    assert {p.dtype for p in other.text_encoder.model.parameters()} == {torch.bfloat16}
    model = other.text_encoder.model
    assert model.shared.weight is model.encoder.embed_tokens.weight  # still tied
    with pytest.raises(BerniniError, match="t5_weights"):
        load_full(tiny_root, t5_weights="both")


def test_component_paths_honour_the_config(tmp_path):
    from bernini_core.loaders_full import component_paths

    config = BerniniConfig.from_dict({
        "model_type": "bernini", "mllm_subfolder": "qwen", "t5_tokenizer_subfolder": "tok", "vae_subfolder": "wan_vae",
        "bernini_ckpt_subfolder": "weights", "vae_model_path": str(tmp_path),
        "base_dir": "ByteDance/Bernini-Diffusers"})
    paths = component_paths(config, tmp_path / "root")
    assert paths.mllm == paths.processor == tmp_path / "root" / "qwen"  # processor_subfolder defaults to mllm's
    assert paths.t5_tokenizer == tmp_path / "root" / "tok" and paths.checkpoint == tmp_path / "root" / "weights"
    assert paths.vae == tmp_path / "wan_vae"  # an existing official vae_model_path wins over the folder
    assert paths.t5_encoder == tmp_path / "root" / "t5_text_encoder"  # docs/official_behaviour.md §2.1 default name
    assert paths.transformer_2_config == tmp_path / "root" / "transformer_2_config.json"


# ---------------------------------------------------------------------------- config and version
def test_config_defaults_and_overrides():
    config = BerniniConfig.from_dict({"model_type": "bernini"})
    assert config.use_unipc is False and config.interpolate_src_id is True and config.max_trained_src_id == 5
    assert config.clip_diff_cfg["depth"] == 16 and config.clip_diff_cfg["width"] == 1536
    assert config.num_mask_token == 256 and config.switch_dit_boundary == 0.875 and config.shift == 3.0
    assert config.connector_cfg["out_dim_for_gen"] == 4096 and config.t5_max_sequence_length == 512
    cli = BerniniConfig.from_dict({"model_type": "bernini", "use_unipc": False, "some_new_field": 1}, CLI_OVERRIDES)
    assert cli.use_unipc is True and cli.use_src_id_rotary_emb is True and cli.extra == {"some_new_field": 1}
    assert BerniniConfig.from_dict({"model_type": "bernini"}, {"version": "v2"}).version_source == "override"


@pytest.mark.parametrize("data, overrides, message", [
    ({"model_type": "bernini_renderer"}, None, "renderer loader"),
    ({"model_type": "bernini", "num_mask_token": "4096"}, None, "'num_mask_token'"),
    ({"model_type": "bernini", "switch_dit_boundary": 8.75}, None, "'switch_dit_boundary'"),
    ({"model_type": "bernini", "use_unipc": "yes"}, None, "'use_unipc'"),
    ({"model_type": "bernini", "clip_diff_cfg": {"depth": 0}}, None, "clip_diff_cfg.depth"),
    ({"model_type": "bernini", "clip_diff_cfg": {"z_channels": 8}}, None, "out_dim_for_vit"),
    ({"model_type": "bernini", "feature_type_from_stage_one": "masked_tgt_embed_with_qwen_txt_tokens"}, None,
     "feature_type_from_stage_one"),
    ({"model_type": "bernini"}, {"use_unipk": True}, "unknown Bernini option"),
    ({"model_type": "bernini"}, {"version": "v3"}, "'version'"),
])
def test_config_errors_name_the_field(data, overrides, message):
    with pytest.raises(BerniniError, match=message):
        BerniniConfig.from_dict(data, overrides)


def test_v1_v2_detection(tmp_path, tiny_root):
    assert detect_version("/m/ByteDance/Bernini-Diffusers-v2/") == ("v2", "folder name")
    assert detect_version("/m/Bernini-Diffusers")[0] == "v1"
    assert detect_version("/c/models--ByteDance--Bernini-Diffusers-v2/snapshots/abc")[0] == "v2"
    v2_base = {"base_dir": "ByteDance/Bernini-Diffusers-v2"}
    assert detect_version("/m/renamed", v2_base) == ("v2", "config.json base_dir")
    assert detect_version("/m/renamed", {"base_dir": "ByteDance/Bernini-Diffusers"})[0] == "v1"
    v2 = make_tiny_bernini(tmp_path, version="v2")
    assert v2.name == "Bernini-Diffusers-v2" and v2.parent == tmp_path
    assert make_tiny_bernini(v2, version="v2") == v2  # already the v2 folder: written in place
    data = json.loads((v2 / "config.json").read_text())
    assert data["interpolate_src_id"] is True and data["max_trained_src_id"] == 5
    assert BerniniConfig.from_dir(v2).version == "v2" and BerniniConfig.from_dir(tiny_root).version == "v1"
    assert BerniniConfig.from_dir(v2, {"version": "v1"}).version == "v1"
    renamed = v2.rename(tmp_path / "bernini_two")
    assert BerniniConfig.from_dir(renamed).version_source == "config.json base_dir"
    with pytest.raises(ValueError, match="would be read as v2"):
        make_tiny_bernini(tmp_path / "x" / "Bernini-Diffusers-v2", version="v1")


def test_check_target_tokens(loaded):
    check_target_tokens(TINY_NUM_MASK_TOKEN, loaded.config)
    with pytest.raises(BerniniError, match=rf"needs {TINY_NUM_MASK_TOKEN + 1} planner tokens .* holds "
                                           rf"{TINY_NUM_MASK_TOKEN} \(config.json num_mask_token\)"):
        check_target_tokens(TINY_NUM_MASK_TOKEN + 1, loaded.config)
    with pytest.raises(BerniniError, match="positive"):
        check_target_tokens(0, loaded.config)


# ---------------------------------------------------------------------------- bad input
def test_renderer_only_folder_is_refused(tiny_renderer_dir):
    with pytest.raises(BerniniError, match="Bernini-R-Diffusers folder, not a Bernini-Diffusers folder.*planner"):
        load_full(tiny_renderer_dir)
    assert not is_full_bernini_dir(tiny_renderer_dir)


def test_missing_shard_is_named(tiny_root, tmp_path):
    broken = copy_without(tiny_root, tmp_path / "Bernini-Diffusers", "model-00002-of-00003.safetensors")
    with pytest.raises(BerniniError, match="Shard 'model-00002-of-00003.safetensors' .* is missing"):
        load_full(broken)


def test_corrupted_config_is_named(tiny_root, tmp_path):
    broken = copy_without(tiny_root, tmp_path / "Bernini-Diffusers", "model-00001-of-00003.safetensors")
    (broken / "config.json").write_text('{"model_type": "bernini", "num_mask_tok')
    with pytest.raises(BerniniError, match=r"config.json' is not valid JSON .* re-download"):
        load_full(broken)


def test_inconsistent_parts_are_refused(tiny_root, tmp_path):
    broken = copy_without(tiny_root, tmp_path / "Bernini-Diffusers")
    (broken / "transformer_2_config.json").write_text(json.dumps(dict(TINY_FULL_DIT, num_attention_heads=2,
                                                                      attention_head_dim=64)))
    with pytest.raises(BerniniError, match="transformer_2_config.json': attention_head_dim 64 .* head dim 128"):
        load_full(broken)
    (broken / "transformer_2_config.json").write_text(json.dumps(dict(TINY_FULL_DIT, text_dim=48)))
    with pytest.raises(BerniniError, match="text_dim 48 differs from config.json connector_cfg.out_dim_for_gen"):
        load_full(broken)
    shutil.rmtree(broken / "t5_tokenizer")
    with pytest.raises(BerniniError, match="incomplete: missing t5_tokenizer/"):
        load_full(broken)
