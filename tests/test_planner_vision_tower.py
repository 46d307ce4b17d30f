"""The planner's Qwen2.5-VL vision tower computes as the official model does (docs/official_behaviour.md §3.10):
one scaled_dot_product_attention call per block over every patch of the call with a [1, L, L] block-diagonal
boolean mask built from cu_seqlens, and the rotary table in the weights' dtype.

The reference below is an independent transcription of the official vision tower forward (official
``bernini/models/modeling_qwen2_5_vl.py``: ``Qwen2_5_VisionTransformerPretrainedModel.forward``,
``rot_pos_emb``, ``get_window_index``, ``Qwen2_5_VLVisionSdpaAttention``), written with plain
torch.nn.functional ops from the tower's parameters. It shares no code with the engine or with transformers'
vision tower, so the bit-for-bit checks fail if the engine attends chunk by chunk (transformers' way: 8.7e-3
relative on the tiny checkpoints) or builds the rotary table in float32 (transformers 5.x: also 8.7e-3).
"""


import pytest
import torch
import torch.nn.functional as F

from bernini_core import BerniniError, BerniniPipeline
from bernini_core.planner.model import PlannerModel
from bernini_core.planner.vision_tower import OfficialVisionAttention, block_diagonal_mask

from test_planner_model import randomize_, tiny_qwen_config


# --------------------------------------------------------------------------- the official tower, transcribed

def _rms(x, weight, eps=1e-6):
    xf = x.to(torch.float32)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _official_windows(grid_thw, window_size, merge, patch):
    """get_window_index: merged-cell order window by window, and the window boundaries in patches."""
    index_all, bounds, offset = [], [0], 0
    cells = window_size // merge // patch
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = cells - gh % cells, cells - gw % cells
        nh, nw = (gh + pad_h) // cells, (gw + pad_w) // cells
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        padded = padded.reshape(t, nh, cells, nw, cells).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, cells, cells)
        seqlens = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index_all.append(flat[flat != -100] + offset)
        bounds.extend((seqlens.cumsum(0) * merge * merge + bounds[-1]).tolist())
        offset += t * gh * gw
    return torch.cat(index_all), torch.unique_consecutive(torch.tensor(bounds, dtype=torch.int32))


def _official_rotary(grid_thw, head_dim, merge, dtype):
    """rot_pos_emb: inv_freq computed in float32 at construction, then cast with the model by the official
    ``mllm.to(weight_dtype)``; the angle table is ``outer(arange(max_grid), inv_freq)`` in that dtype."""
    dim = head_dim // 2
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).to(dtype)
    pos = []
    for t, h, w in grid_thw.tolist():
        hp = torch.arange(h).unsqueeze(1).expand(-1, w).reshape(h // merge, merge, w // merge, merge)
        wp = torch.arange(w).unsqueeze(0).expand(h, -1).reshape(h // merge, merge, w // merge, merge)
        pos.append(torch.stack([hp.permute(0, 2, 1, 3).flatten(), wp.permute(0, 2, 1, 3).flatten()], -1).repeat(t, 1))
    pos = torch.cat(pos)
    table = torch.outer(torch.arange(int(grid_thw[:, 1:].max()), dtype=dtype), inv_freq)
    return table[pos].flatten(1)


def official_vision_tower(visual, pixel_values, grid_thw):
    """The official forward with its SDPA attention: the merged features of every item, in input order."""
    cfg = visual.config
    p = dict(visual.named_parameters())
    merge, unit, heads = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2, cfg.num_heads
    grid_thw = torch.as_tensor(grid_thw).reshape(-1, 3)
    weight = p["patch_embed.proj.weight"]
    x = pixel_values.view(-1, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    x = F.conv3d(x.to(weight.dtype), weight, stride=weight.shape[2:]).view(-1, cfg.hidden_size)
    rotary = _official_rotary(grid_thw, cfg.hidden_size // heads, merge, weight.dtype)
    window_index, cu_window = _official_windows(grid_thw, cfg.window_size, merge, cfg.patch_size)
    cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0, dtype=torch.int32),
                    (1, 0), value=0)
    n = x.shape[0]
    x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    rotary = rotary.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
    emb = torch.cat((rotary, rotary), dim=-1)
    cos, sin = emb.cos().unsqueeze(-2).float(), emb.sin().unsqueeze(-2).float()  # cos/sin in the table's dtype
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        cu = cu_full if i in cfg.fullatt_block_indexes else cu_window
        h = _rms(x, p[b + "norm1.weight"])
        q, k, v = F.linear(h, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"]).reshape(n, 3, heads, -1) \
            .permute(1, 0, 2, 3).unbind(0)
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(v.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(v.dtype)
        mask = torch.zeros([1, n, n], dtype=torch.bool)
        for j in range(1, len(cu)):  # the official loop
            mask[..., cu[j - 1]:cu[j], cu[j - 1]:cu[j]] = True
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                             v.transpose(0, 1).unsqueeze(0), mask, dropout_p=0.0)
        out = out.squeeze(0).transpose(0, 1).reshape(n, -1)
        x = x + F.linear(out, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        h = _rms(x, p[b + "norm2.weight"])
        gate = F.linear(h, p[b + "mlp.gate_proj.weight"], p[b + "mlp.gate_proj.bias"])
        up = F.linear(h, p[b + "mlp.up_proj.weight"], p[b + "mlp.up_proj.bias"])
        x = x + F.linear(F.silu(gate) * up, p[b + "mlp.down_proj.weight"], p[b + "mlp.down_proj.bias"])
    assert cfg.hidden_act == "silu"
    m = _rms(x, p["merger.ln_q.weight"]).view(-1, cfg.hidden_size * unit)
    m = F.linear(F.gelu(F.linear(m, p["merger.mlp.0.weight"], p["merger.mlp.0.bias"])),
                 p["merger.mlp.2.weight"], p["merger.mlp.2.bias"])
    m = m[torch.argsort(window_index)]
    return list(torch.split(m, (grid_thw.prod(-1) // unit).tolist()))


# --------------------------------------------------------------------------- unit level

def build_planner(dtype, implementation="sdpa"):
    torch.manual_seed(0)
    model = PlannerModel.build(tiny_qwen_config(), num_mask_tokens=8, gen_dim=48, decoder_width=32,
                               decoder_depth=1, mllm_dtype=dtype, attn_implementation=implementation)
    return randomize_(model, seed=3, std=0.05)


GRIDS = {
    "480p image (several windows)": [[1, 12, 20]],
    "video, 3 frame groups": [[3, 12, 20]],
    "ragged windows": [[2, 10, 14]],
    "two items in one call": [[1, 4, 4], [2, 8, 6]],
}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def planner(request):
    return build_planner(request.param)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_vision_features_equal_the_official_tower_bit_for_bit(planner, grid):
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    ours = planner.vision_features(pixels, grid)
    with torch.no_grad():
        reference = official_vision_tower(planner.visual, pixels.to(next(planner.visual.parameters()).dtype), grid)
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_swap_is_per_instance_and_keeps_the_weights():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    planner = build_planner(torch.float32)
    attn = planner.visual.blocks[0].attn
    assert isinstance(attn, OfficialVisionAttention)
    # The block's own layers: no copy, the same state-dict keys as the official checkpoint.
    keys = set(planner.visual.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight"} <= keys
    assert not any("_masks" in k for k in keys)
    # Nothing process-wide: a Qwen model built afterwards keeps transformers' own attention.
    other = qwen.Qwen2_5_VLModel._from_config(tiny_qwen_config(), attn_implementation="sdpa")
    assert type(other.visual.blocks[0].attn) is qwen.Qwen2_5_VLVisionAttention
    # Masks are dropped after each call (nothing held between calls).
    grid = torch.tensor([[1, 4, 4]])
    planner.vision_features(torch.randn(16, 1176), grid)
    assert planner.visual._bernini_vision_masks.entries == []


def test_eager_planner_uses_the_official_eager_formula():
    sdpa, eager = build_planner(torch.float32), build_planner(torch.float32, "eager")
    assert eager.visual.blocks[0].attn.implementation == "eager"
    grid = torch.tensor([[2, 8, 12]])
    pixels = torch.randn(192, 1176, generator=torch.Generator().manual_seed(2))
    a, b = sdpa.vision_features(pixels, grid)[0], eager.vision_features(pixels, grid)[0]
    # Same mathematics in fp32, different summation order: bounded by a few fp32 ulps of the O(0.1) features.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_block_diagonal_mask_equals_the_official_loop():
    cu = torch.tensor([0, 4, 4, 9, 16], dtype=torch.int32)
    loop = torch.zeros([1, 16, 16], dtype=torch.bool)
    for j in range(1, len(cu)):
        loop[..., cu[j - 1]:cu[j], cu[j - 1]:cu[j]] = True
    assert torch.equal(block_diagonal_mask(cu, 16, "cpu"), loop)
    with pytest.raises(ValueError, match="covers 16 patches"):
        block_diagonal_mask(cu, 17, "cpu")


def test_flash_vision_attention_is_refused():
    config = tiny_qwen_config()
    config.vision_config._attn_implementation = "flash_attention_2"
    from transformers import Qwen2_5_VLModel

    mllm = Qwen2_5_VLModel._from_config(config, attn_implementation="sdpa")
    mllm.visual.config._attn_implementation = "flash_attention_2"
    base = build_planner(torch.float32)
    with pytest.raises(BerniniError, match="attn_implementation='sdpa'"):
        PlannerModel(mllm, base.connector, base.vit_decoder, base.mask_tokens)


# --------------------------------------------------------------------------- through the pipeline

SMALL = dict(num_frames=5, height=32, width=32, max_image_size=48, num_inference_steps=1, planning_step=1,
             vit_denoising_step=1)


@pytest.fixture(scope="module")
def pipe(tiny_bernini_v1_dir):
    return BerniniPipeline.from_pretrained(tiny_bernini_v1_dir, device="cpu", dtype="bf16")


def _cases(media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "i2i": ("i2i", {"image": refs[0]}),
        "v2v": ("v2v", {"video": video}),
        "v2v_apg": ("v2v", {"video": video, "guidance_mode": "v2v_apg"}),
        "rv2v": ("rv2v", {"video": video, "images": refs}),
        "r2v": ("r2v", {"images": refs}),
        "r2v_6_refs": ("r2v", {"images": refs * 3}),
        "ads2v": ("ads2v", {"video": [video, ref_video]}),
    }


@pytest.mark.parametrize("case", ["i2i", "v2v", "v2v_apg", "rv2v", "r2v", "r2v_6_refs", "ads2v"])
def test_pipeline_with_sources_equals_the_official_vision_path(pipe, media_dir, monkeypatch, case):
    task, kwargs = _cases(media_dir)[case]
    settings = dict(SMALL, num_frames=1) if task == "i2i" else dict(SMALL)
    model = pipe.planner.model
    seen = []
    real = model.vision_features

    def recording(pixel_values, grid_thw):
        features = real(pixel_values, grid_thw)
        with torch.no_grad():
            reference = official_vision_tower(model.visual, pixel_values, grid_thw)
        seen.append(all(torch.equal(a, b) for a, b in zip(features, reference)))
        return features

    monkeypatch.setattr(model, "vision_features", recording)
    ours = pipe(task, "a small red fox", seed=5, **kwargs, **settings).latents
    assert seen and all(seen), f"{case}: vision features differ from the official tower in {seen.count(False)} calls"

    def official(pixel_values, grid_thw):
        with torch.no_grad():
            return official_vision_tower(model.visual, pixel_values, torch.as_tensor(grid_thw).reshape(-1, 3))

    monkeypatch.setattr(model, "vision_features", official)
    reference = pipe(task, "a small red fox", seed=5, **kwargs, **settings).latents
    relative = ((ours.double() - reference.double()).norm() / reference.double().norm()).item()
    assert relative <= 1e-6, f"{case}: final latents {relative:.2e} relative from the official vision path"
