"""Renderer DiT: parity with diffusers' Wan transformer, SA-3D RoPE against a transcription of
docs/official_behaviour.md §4.3, stream/context semantics, config, attention backends and dtype policy.

Tiny config: 2 heads x head_dim 20 (RoPE t/h/w = 8/6/6 channels, so the three parts differ),
2 layers, ffn 32, text_dim 32, freq_dim 256. CPU, fp32 unless stated.
"""

import copy
import math
import types

import pytest
import torch
from torch import nn

from bernini_core.errors import BerniniError
from bernini_core.renderer import (
    FP32_PARAM_PATTERNS,
    WAN21_1_3B,
    WAN22_A14B,
    BerniniDiT,
    DiTConfig,
    attention,
    available_backends,
    cast_dit_,
    source_ids_for,
)
from bernini_core.renderer.rope import axis_split, stream_frequencies

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402  (test-only dependency)

TINY = DiTConfig(num_attention_heads=2, attention_head_dim=20, text_dim=32, ffn_dim=32, num_layers=2,
                 rope_max_seq_len=32)


# ----------------------------------------------------------------------------- helpers
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _randomised_state(model: nn.Module, seed: int) -> dict:
    """Random weights everywhere, norms away from identity, so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm2.weight"):
            state[name] = 1.0 + 0.2 * noise
        elif name.endswith("bias") or "scale_shift_table" in name:
            state[name] = 0.2 * noise
        else:
            fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
            state[name] = noise / math.sqrt(fan_in)
    return state


@pytest.fixture(scope="module")
def models():
    """(diffusers reference, ours) with identical random weights, loaded strictly by name."""
    reference = WanTransformer3DModel.from_config(TINY.to_dict()).eval()
    reference.load_state_dict(_randomised_state(reference, seed=0))
    ours = BerniniDiT(TINY).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # proves the parameter names match
    ours.set_attention_backend("sdpa")
    return reference, ours


def _latent(seed, b, t, h, w, channels=16):
    return torch.randn(b, channels, t, h, w, generator=torch.Generator().manual_seed(seed))


def _context(seed, b, rows, dim=32):
    return torch.randn(b, rows, dim, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------- independent fp64 transcription of docs/official_behaviour.md §4
def _layer_norm(x, weight=None, bias=None, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _token_angles(grid, sid, head_dim):
    """Per token (t, h, w order) the head_dim/2 angles pos_axis(k)*w_axis,k + sid*w'_k
    (docs/official_behaviour.md §4.3)."""
    dt, dh, dw = head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)
    rows = []
    for f in range(grid[0]):
        for i in range(grid[1]):
            for j in range(grid[2]):
                angles = [f * 10000.0 ** (-2 * k / dt) for k in range(dt // 2)]
                angles += [i * 10000.0 ** (-2 * k / dh) for k in range(dh // 2)]
                angles += [j * 10000.0 ** (-2 * k / dw) for k in range(dw // 2)]
                rows.append([a + sid * 10000.0 ** (-2 * k / head_dim) for k, a in enumerate(angles)])
    return torch.tensor(rows, dtype=torch.float64)


def reference_forward(state, cfg, streams, sids, timestep, context):
    """The DiT written out from the formulas (docs/wan_qwen.md §1.2, docs/official_behaviour.md §4.2–§4.4) in fp64."""
    sd = {k: v.double() for k, v in state.items()}
    dim, heads, head_dim, eps = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps
    pt, ph, pw = cfg.patch_size

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def rms(x, weight):
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x, angles):  # interleaved pairs (x[2k], x[2k+1]) rotated by angle k
        cos, sin = torch.cos(angles)[None, :, None, :], torch.sin(angles)[None, :, None, :]
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    def attend(q, k, v):  # explicit softmax attention, [B, L, heads, head_dim]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)

    tokens, angles = [], []
    for latent, sid in zip(streams, sids):
        b, c, t, h, w = latent.shape
        grid = (t // pt, h // ph, w // pw)
        patches = latent.double().reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), -1)
        tokens.append(patches @ sd["patch_embedding.weight"].reshape(dim, -1).T + sd["patch_embedding.bias"])
        angles.append(_token_angles(grid, float(sid), head_dim))
    x, angles = torch.cat(tokens, 1), torch.cat(angles, 0)
    batch = x.shape[0]

    # timestep features [cos, sin]: the official code (diffusers Timesteps) forms them in fp32, and
    # at t ~ 1000 that rounding (~1e-5 of the angle) is part of the model's numerics, so keep it.
    half = cfg.freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    phase = timestep.float()[:, None] * freqs[None]
    sinusoid = torch.cat([torch.cos(phase), torch.sin(phase)], -1).double()
    temb = lin(torch.nn.functional.silu(lin(sinusoid, "condition_embedder.time_embedder.linear_1")),
               "condition_embedder.time_embedder.linear_2")
    modulation = lin(torch.nn.functional.silu(temb), "condition_embedder.time_proj").reshape(batch, 6, dim)

    ctx = context.double()
    ctx = torch.cat([ctx, ctx.new_zeros(batch, max(0, 512 - ctx.shape[1]), ctx.shape[2])], 1)
    ctx = lin(_gelu_tanh(lin(ctx, "condition_embedder.text_embedder.linear_1")),
              "condition_embedder.text_embedder.linear_2")

    def heads_of(t):
        return t.reshape(t.shape[0], t.shape[1], heads, head_dim)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        mod = sd[p + "scale_shift_table"] + modulation
        shift, scale, gate, f_shift, f_scale, f_gate = (mod[:, j : j + 1] for j in range(6))
        h = _layer_norm(x, eps=eps) * (1 + scale) + shift
        q = rotate(heads_of(rms(lin(h, p + "attn1.to_q"), sd[p + "attn1.norm_q.weight"])), angles)
        k = rotate(heads_of(rms(lin(h, p + "attn1.to_k"), sd[p + "attn1.norm_k.weight"])), angles)
        v = heads_of(lin(h, p + "attn1.to_v"))
        x = x + lin(attend(q, k, v).reshape(x.shape), p + "attn1.to_out.0") * gate
        h = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        q = heads_of(rms(lin(h, p + "attn2.to_q"), sd[p + "attn2.norm_q.weight"]))
        k = heads_of(rms(lin(ctx, p + "attn2.to_k"), sd[p + "attn2.norm_k.weight"]))
        v = heads_of(lin(ctx, p + "attn2.to_v"))
        x = x + lin(attend(q, k, v).reshape(x.shape), p + "attn2.to_out.0")
        h = _layer_norm(x, eps=eps) * (1 + f_scale) + f_shift
        x = x + lin(_gelu_tanh(lin(h, p + "ffn.net.0.proj")), p + "ffn.net.2") * f_gate

    b, c, t, h, w = streams[-1].shape
    grid = (t // pt, h // ph, w // pw)
    target = x[:, -math.prod(grid):]
    shift = sd["scale_shift_table"][:, 0:1] + temb[:, None]
    scale = sd["scale_shift_table"][:, 1:2] + temb[:, None]
    out = lin(_layer_norm(target, eps=eps) * (1 + scale) + shift, "proj_out")
    out = out.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, -1, t, h, w)


# ----------------------------------------------------------------------------- 1. diffusers parity
@torch.no_grad()
def test_single_stream_matches_diffusers_full_context(models):
    reference, ours = models
    latent, context = _latent(1, 2, 3, 8, 8), _context(2, 2, 512)
    timestep = torch.tensor([999.0, 412.0])
    expected = reference(latent, timestep, context).sample
    actual = ours([latent], [0.0], timestep, context)
    assert actual.shape == expected.shape == latent.shape
    assert rel_err(actual, expected) < 1e-5


@torch.no_grad()
def test_short_context_is_zero_padded_like_diffusers_given_padded_input(models):
    reference, ours = models
    latent, short = _latent(3, 1, 2, 6, 4), _context(4, 1, 20)
    padded = torch.cat([short, torch.zeros(1, 492, 32)], 1)
    timestep = torch.tensor([700.0])
    expected = reference(latent, timestep, padded).sample
    actual = ours([latent], [0.0], timestep, short)
    assert rel_err(actual, expected) < 1e-5
    # padding is not a no-op: the 20-row context fed unpadded to diffusers gives another result
    assert rel_err(reference(latent, timestep, short).sample, expected) > 1e-3


def test_sid_zero_table_equals_diffusers_wan_rope():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim = TINY.attention_head_dim
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 32)
    cos, sin = rope(torch.zeros(1, 16, 3, 10, 8))  # grid 3 x 5 x 4
    ours = stream_frequencies((3, 5, 4), 0.0, head_dim)
    assert axis_split(head_dim) == (8, 6, 6) and axis_split(128) == (44, 42, 42)
    # diffusers rounds its (fp64-computed) tables to fp32; ours stay complex128 like the official code
    assert (ours.real - cos[0, :, 0, 0::2].double()).abs().max() < 1e-7
    assert (ours.imag - sin[0, :, 0, 1::2].double()).abs().max() < 1e-7
    assert (ours.real - cos[0, :, 0, 1::2].double()).abs().max() < 1e-7  # interleaved: pair shares angle


# ----------------------------------------------------------------------------- 2. SA-3D RoPE
@torch.no_grad()
def test_single_stream_matches_spec_transcription(models):
    _, ours = models
    latent, context = _latent(5, 1, 3, 8, 8), _context(6, 1, 512)
    timestep = torch.tensor([250.0])
    expected = reference_forward(ours.state_dict(), TINY, [latent], [0.0], timestep, context)
    assert rel_err(ours([latent], [0.0], timestep, context), expected) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("n_images", [2, 6])  # integer ids 1..3, and fractional linspace(1, 5, 7) ids
def test_multi_stream_source_ids_match_spec_transcription(models, n_images):
    _, ours = models
    video = _latent(10, 1, 2, 4, 6)
    images = [_latent(20 + i, 1, 1, 4, 4) for i in range(n_images)]
    target = _latent(11, 1, 2, 6, 4)
    sids = source_ids_for(1 + n_images)
    if n_images == 6:
        assert sids != [float(i) for i in range(1, 8)] and sids[1] == pytest.approx(1.6666666, abs=1e-6)
    streams, ids = images + [video, target], sids[1:] + sids[:1] + [0.0]  # images first, video id 1
    context, timestep = _context(12, 1, 512), torch.tensor([875.0])
    expected = reference_forward(ours.state_dict(), TINY, streams, ids, timestep, context)
    actual = ours(streams, ids, timestep, context)
    assert actual.shape == target.shape
    assert rel_err(actual, expected) < 1e-5
    # the source-id phase matters: all sources at id 0 give a different output
    assert rel_err(ours(streams, [0.0] * len(streams), timestep, context), expected) > 1e-3


# ----------------------------------------------------------------------------- 3. stream semantics
@torch.no_grad()
def test_sources_matter_but_their_order_does_not(models):
    _, ours = models
    a, b = _latent(30, 1, 1, 4, 4), _latent(31, 1, 2, 4, 6)
    target, context, t = _latent(32, 1, 2, 4, 4), _context(33, 1, 512), torch.tensor([500.0])
    alone = ours([target], [0.0], t, context)
    with_sources = ours([a, b, target], [1.0, 2.0, 0.0], t, context)
    swapped = ours([b, a, target], [2.0, 1.0, 0.0], t, context)
    assert with_sources.shape == alone.shape == target.shape  # only the target is returned
    assert rel_err(with_sources, alone) > 1e-3
    assert rel_err(swapped, with_sources) < 1e-5
    # exchanging the ids (not the order) is a different conditioning
    assert rel_err(ours([a, b, target], [2.0, 1.0, 0.0], t, context), with_sources) > 1e-4


@torch.no_grad()
def test_rope_tables_are_cached_per_layout():
    model = BerniniDiT(TINY).eval()
    target, context, t = _latent(40, 1, 1, 4, 4), _context(41, 1, 16), torch.tensor([10.0])
    src = _latent(42, 1, 1, 4, 4)
    for _ in range(3):
        model([src, target], [1.0, 0.0], t, context)
    assert model.rope_cache.builds == 1
    model([src, target], [2.0, 0.0], t, context)
    model([target], [0.0], t, context)
    assert model.rope_cache.builds == 3


# ----------------------------------------------------------------------------- 4. context handling
@torch.no_grad()
def test_context_lens_batch_equals_separate_calls(models):
    _, ours = models
    latents = _latent(50, 2, 2, 4, 4)
    src = _latent(51, 2, 1, 4, 4)
    long_ctx, short_ctx = _context(52, 1, 600), _context(53, 1, 300)
    batched_ctx = torch.cat([long_ctx, torch.cat([short_ctx, 5.0 * torch.ones(1, 300, 32)], 1)], 0)
    t = torch.tensor([900.0, 300.0])
    batched = ours([src, latents], [1.0, 0.0], t, batched_ctx, context_lens=[600, 300])
    first = ours([src[:1], latents[:1]], [1.0, 0.0], t[:1], long_ctx)
    second = ours([src[1:], latents[1:]], [1.0, 0.0], t[1:], short_ctx)
    assert rel_err(batched[:1], first) < 1e-5
    assert rel_err(batched[1:], second) < 1e-5
    # without context_lens the padded rows of sample 2 are real keys: a different result
    assert rel_err(ours([src, latents], [1.0, 0.0], t, batched_ctx)[1:], second) > 1e-3
    with pytest.raises(BerniniError, match="context_lens"):
        ours([latents], [0.0], t, batched_ctx, context_lens=[600, 700])


@torch.no_grad()
def test_pre_embedded_context_equals_raw_context(models):
    _, ours = models
    latent, src = _latent(70, 1, 2, 4, 4), _latent(71, 1, 1, 4, 4)
    t = torch.tensor([700.0])
    for rows in (20, 512, 640):
        context = _context(72 + rows, 1, rows)
        embedded = ours.embed_context(context)
        assert embedded.hidden.shape[1] == max(rows, 512)
        assert torch.equal(ours([src, latent], [1.0, 0.0], t, embedded), ours([src, latent], [1.0, 0.0], t, context))
    with pytest.raises(BerniniError, match="batch"):
        ours([_latent(1, 2, 1, 4, 4)], [0.0], torch.tensor([1.0, 2.0]), ours.embed_context(_context(1, 1, 20)))


@torch.no_grad()
def test_long_context_is_not_truncated(models):
    reference, ours = models
    latent, context, t = _latent(60, 1, 1, 4, 6), _context(61, 1, 700), torch.tensor([600.0])
    full = ours([latent], [0.0], t, context)
    assert rel_err(full, reference(latent, t, context).sample) < 1e-5
    assert rel_err(ours([latent], [0.0], t, context[:, :512]), full) > 1e-3


# ----------------------------------------------------------------------------- 5. ids, config, backends
def test_source_ids_for_values():
    assert source_ids_for(0) == []
    assert source_ids_for(3) == [1.0, 2.0, 3.0]
    assert source_ids_for(5) == [1.0, 2.0, 3.0, 4.0, 5.0]
    six = source_ids_for(6)
    assert six[0] == 1.0 and six[-1] == 5.0 and len(six) == 6
    assert six[1] == pytest.approx(1.7999999523, abs=1e-9) and six[1] != 1.8  # float32, docs/official_behaviour.md §7.2
    assert six == torch.linspace(1, 5, 6, dtype=torch.float32).tolist()
    assert source_ids_for(6, interpolate=False) == [float(i) for i in range(1, 7)]
    assert source_ids_for(4, max_trained=3)[1] == pytest.approx(1.6666666, abs=1e-6)
    with pytest.raises(BerniniError):
        source_ids_for(-1)


def test_config_round_trip_and_presets():
    assert WAN22_A14B.inner_dim == 5120 and WAN22_A14B.num_layers == 40 and WAN22_A14B.ffn_dim == 13824
    assert WAN21_1_3B.inner_dim == 1536 and WAN21_1_3B.num_layers == 30 and WAN21_1_3B.ffn_dim == 8960
    for cfg in (TINY, WAN22_A14B, WAN21_1_3B):
        assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    # a diffusers model's own config (with its bookkeeping keys) parses to the same config
    diffusers_cfg = dict(WanTransformer3DModel.from_config(TINY.to_dict()).config)
    diffusers_cfg.update({"_diffusers_version": "0.35.2", "use_src_id_rotary_emb": True, "some_future_key": 1})
    assert DiTConfig.from_dict(diffusers_cfg) == TINY
    assert DiTConfig.from_dict({"out_channels": None, "in_channels": 16}).out_channels == 16


def test_full_size_models_build_on_meta_with_the_published_parameter_counts():
    # docs/wan_qwen.md §1.1: 14,288,491,584 per A14B expert, 1,418,996,800 for Wan2.1-1.3B
    for cfg, count in ((WAN22_A14B, 14_288_491_584), (WAN21_1_3B, 1_418_996_800)):
        model = BerniniDiT(cfg, device="meta", dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("bad", [
    {"image_dim": 1280}, {"added_kv_proj_dim": 5120}, {"pos_embed_seq_len": 514}, {"num_layers": 0},
    {"attention_head_dim": 127}, {"attention_head_dim": 4}, {"patch_size": [1, 2]}, {"qk_norm": "rms_norm"},
    {"eps": -1.0}, {"num_attention_heads": "40"}, {"cross_attn_norm": "yes"},
])
def test_config_errors(bad):
    with pytest.raises(BerniniError):
        DiTConfig.from_dict({**WAN22_A14B.to_dict(), **bad})
    with pytest.raises(BerniniError):
        DiTConfig.from_dict(["not", "a", "dict"])


def test_attention_function_and_backend_errors():
    gen = torch.Generator().manual_seed(70)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=gen) for _ in range(3))
    k, v = k.repeat(1, 2, 1, 1)[:, :7], v.repeat(1, 2, 1, 1)[:, :7]
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(8)  # fp64 reference
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v.double())
    # Why 1e-5: fp32 attention rounds a length-8 dot product, a 7-way softmax and a 7-term weighted sum, worst
    # case ~(8 + 7 + 7)·2^-24 ≈ 1.3e-6 of max|out|, and the kernel's blocking differs by CPU; measured 1.1e-7..1.2e-7
    # (threads 1-4, ATEN_CPU_CAPABILITY default/avx2/avx512). No mask, scale 1/8 or a mask one key off: 0.65..1.06.
    for backend in ("sdpa", "auto", None):
        assert rel_err(attention(q, k, v, key_mask=mask, backend=backend), expected) < 1e-5
    assert "sdpa" in available_backends()
    with pytest.raises(BerniniError, match="sdpa"):
        attention(q, k, v, backend="nope")
    with pytest.raises(BerniniError, match="sdpa"):
        BerniniDiT(TINY).set_attention_backend("xformers")
    for name in ("flash", "sage"):
        if name not in available_backends():
            with pytest.raises(BerniniError, match="not available"):
                attention(q, k, v, backend=name)
        else:  # installed: CPU fp32 tensors are refused with advice instead of crashing
            with pytest.raises(BerniniError, match="CUDA"):
                attention(q, k, v, backend=name)


@torch.no_grad()
def test_sequence_parallel_handler_belongs_to_the_instance_and_takes_self_attention_only(models):
    """The multi-process equality is tests/integration/test_parallel_ulysses.py; here a group of one (no communication)."""
    from bernini_core.parallel import UlyssesAttention

    _, ours = models
    calls = []

    class Recording(UlyssesAttention):
        def __call__(self, q, k, v, local_attention, length=None):
            calls.append((tuple(q.shape), length))
            return super().__call__(q, k, v, local_attention, length=length)

    latent, context, t = _latent(80, 1, 1, 4, 4), _context(81, 1, 512), torch.tensor([5.0])
    plain = ours([latent], [0.0], t, context)
    parallel = BerniniDiT(TINY).eval()  # a second instance with the same weights
    parallel.load_state_dict(ours.state_dict())
    parallel.set_attention_backend("sdpa")
    parallel.use_sequence_parallel(Recording(None))
    hooked = parallel([latent], [0.0], t, context)
    assert ours.sequence_parallel is None and parallel.sequence_parallel is not None
    assert len(calls) == TINY.num_layers and calls[0] == ((1, 4, 2, 20), 4)  # self-attention over the 4 tokens
    assert torch.equal(hooked, plain)
    calls.clear()
    assert torch.equal(ours([latent], [0.0], t, context), plain) and calls == []  # the plain instance is untouched
    parallel.use_sequence_parallel(None)
    assert torch.equal(parallel([latent], [0.0], t, context), plain) and calls == []


def test_layers_are_built_from_ops():
    made = []

    def recording(base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(base.__name__)
        return Recorded

    ops = types.SimpleNamespace(**{n: recording(getattr(nn, n)) for n in
                                   ("Linear", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm", "Embedding")})
    model = BerniniDiT(TINY, ops=ops)
    plain = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv3d, nn.LayerNorm)]
    assert plain == [] and made.count("Conv3d") == 1 and "Linear" in made and "LayerNorm" in made


def test_bad_streams_raise_user_errors(models):
    _, ours = models
    context, t = _context(90, 1, 16), torch.tensor([1.0])
    with pytest.raises(BerniniError, match="streams\\[0\\]"):
        ours([_latent(91, 1, 1, 5, 4)], [0.0], t, context)  # odd height
    with pytest.raises(BerniniError, match="streams\\[0\\]"):
        ours([_latent(91, 1, 1, 4, 4, channels=36)], [0.0], t, context)
    with pytest.raises(BerniniError, match="source_ids"):
        ours([_latent(91, 1, 1, 4, 4)], [], t, context)
    with pytest.raises(BerniniError, match="context"):
        ours([_latent(91, 1, 1, 4, 4)], [0.0], t, torch.zeros(1, 16, 31))


# ----------------------------------------------------------------------------- 6. dtypes
@torch.no_grad()
@pytest.mark.parametrize("islands", [True, False])
def test_bf16_forward_is_close_to_fp32(models, islands):
    _, ours = models
    model = cast_dit_(copy.deepcopy(ours), torch.bfloat16, keep_fp32_islands=islands)
    for name, param in model.named_parameters():
        is_island = any(p in name.split(".") for p in FP32_PARAM_PATTERNS)
        assert param.dtype == (torch.float32 if islands and is_island else torch.bfloat16), name
    assert model.condition_embedder.time_proj.weight.dtype == torch.bfloat16  # not an island (diffusers)
    assert (model.blocks[0].norm2.weight.dtype == torch.float32) == islands
    src, target = _latent(100, 1, 1, 4, 4), _latent(101, 1, 2, 4, 4)
    context, t = _context(102, 1, 512), torch.tensor([950.0])
    expected = ours([src, target], [1.0, 0.0], t, context)
    actual = model([src, target], [1.0, 0.0], t, context)
    assert actual.dtype == torch.float32  # dtype of the input latent
    # Why 5e-2: ~45 bf16 roundings (unit 2^-9) on the deepest path of 2 blocks, ≈ sqrt(45)·2^-9 ≈ 1.3e-2 when they
    # add up like a random walk; measured 5.5e-3..7.0e-3 (threads 1-4, ATEN_CPU_CAPABILITY default/avx2/avx512).
    assert rel_err(actual, expected) < 5e-2
    assert model([src.bfloat16(), target.bfloat16()], [1.0, 0.0], t, context.bfloat16()).dtype == torch.bfloat16
