"""Planner model pieces: connector, ViT decoder (net + flow-matching sampler), Qwen wrapper.

References: the docs/official_behaviour.md §2.1 key names written out by hand; the §3.6 sampler and the official module
formulas transcribed here with plain torch.nn.functional ops (bf16 rounding per operation where the official code runs
in bf16); transformers' own Qwen2.5-VL forward (``output_hidden_states``) and ``get_image_features``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from bernini_core.errors import BerniniError
from bernini_core.planner.branch import EncodedBranch
from bernini_core.planner.connector import Connector
from bernini_core.planner.model import PlannerModel
from bernini_core.planner.vit_decoder import ViTDecoder, flow_match_schedule

HIDDEN = 64


# --------------------------------------------------------------------------- helpers

def tiny_qwen_config(layers: int = 3):
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0)
    vision = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=HIDDEN,
                  spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1], in_chans=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                            vision_start_token_id=289, bos_token_id=0, eos_token_id=1)


def randomize_(module, seed, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def bf(x):
    return x.to(torch.bfloat16)


def ref_rmsnorm(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def ref_connector(conn, h, which):
    """Official MLPConnector transcribed: Linear, exact GELU, [Linear,] RMSNorm(1e-6), Linear."""
    p = dict(conn.named_parameters())
    lin = lambda x, k: F.linear(x, p[f"{which}.{k}.weight"], p[f"{which}.{k}.bias"])
    if which == "proj_gen":
        x = F.gelu(lin(h, 0))
        return lin(ref_rmsnorm(x, p["proj_gen.2.weight"]), 3)
    x = lin(F.gelu(lin(h, 0)), 2)
    return lin(ref_rmsnorm(x, p["pred_vit.3.weight"]), 4)


def ref_net(dec, x, t, c):
    """SimpleMLPAdaLN transcribed from docs/official_behaviour.md §3.6 with F ops (same operation order as the official
    modules)."""
    p = dict(dec.named_parameters())
    lin = lambda v, k: F.linear(v, p[k + ".weight"], p[k + ".bias"])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(t.dtype)
    temb = lin(F.silu(lin(temb, "net.time_embed.mlp.0")), "net.time_embed.mlp.2")
    y = temb + lin(c, "net.cond_embed")
    h = lin(x, "net.input_proj")
    width = h.shape[-1]
    i = 0
    while f"net.res_blocks.{i}.in_ln.weight" in p:
        b = f"net.res_blocks.{i}"
        shift, scale, gate = lin(F.silu(y), b + ".adaLN_modulation.1").chunk(3, -1)
        normed = F.layer_norm(h, (width,), p[b + ".in_ln.weight"], p[b + ".in_ln.bias"], 1e-6)
        m = lin(F.silu(lin(normed * (1 + scale) + shift, b + ".mlp.0")), b + ".mlp.2")
        h = h + gate * m
        i += 1
    shift, scale = lin(F.silu(y), "net.final_layer.adaLN_modulation.1").chunk(2, -1)
    normed = F.layer_norm(h, (width,), None, None, 1e-6)
    return lin(normed * (1 + scale) + shift, "net.final_layer.linear")


def ref_sigmas(steps):
    """docs/official_behaviour.md §3.6 + §7.2 in bf16: torch's bf16 linspace (start/end/step rounded to bf16,
    value = start + step·i for the first half, end − step·(n−1−i) for the rest, rounded per operation), then
    σ' = 2σ/(1+σ) and t = 1000σ', every operation rounded to bf16. (torch's vectorised CPU kernel departs from this
    scalar rule for some counts — 11, 22, ... — so only counts it agrees on are used here.)"""
    r = lambda v: float(torch.tensor(v, dtype=torch.float64).to(torch.bfloat16))
    points = steps + 1
    start, end = r(1.0), r(0.003 / 1.002)
    step = r((end - start) / (points - 1))
    raw = [r(start + r(step * i)) if i < points // 2 else r(end - r(step * (points - 1 - i))) for i in range(steps)]
    sig = [r(r(2.0 * s) / r(1.0 + r(1.0 * s))) for s in raw]
    return sig, [r(s * 1000) for s in sig]


def ref_sample(dec, zc, zu, zi, txt, img, steps, noise):
    """docs/official_behaviour.md §3.6 sampler: Euler over bf16 sigmas, velocity prediction, 3/2/1-way CFG, σ_next = 0
    at the end."""
    mode = 3 if (img is not None and txt > 1) else (2 if txt > 1 else 1)
    z = torch.cat([zc, zu, zi][:mode])
    sig, ts = ref_sigmas(steps)
    x = noise.to(z.dtype)
    for k in range(steps):
        t = torch.tensor([ts[k]], dtype=torch.bfloat16).to(z.dtype)
        v = ref_net(dec, torch.cat([x] * mode), t, z)
        n = zc.shape[0]
        if mode == 3:
            vc, vu, vi = v[:n], v[n:2 * n], v[2 * n:]
            v = vu + img * (vi - vu) + txt * (vc - vi)
        elif mode == 2:
            vc, vu = v[:n], v[n:]
            v = vu + txt * (vc - vu)
        s_next = sig[k + 1] if k + 1 < steps else 0.0
        d = torch.tensor(s_next, dtype=torch.bfloat16) - torch.tensor(sig[k], dtype=torch.bfloat16)
        x = x + v * d
    return x


def decoder_keys(depth):
    """The `vit_decoder.` keys of docs/official_behaviour.md §2.1 (prefix stripped), written out from that
    list."""
    keys = {f"net.{m}.{w}" for m in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed", "input_proj",
                                    "final_layer.linear", "final_layer.adaLN_modulation.1") for w in ("weight", "bias")}
    for i in range(depth):
        for m in ("in_ln", "mlp.0", "mlp.2", "adaLN_modulation.1"):
            keys |= {f"net.res_blocks.{i}.{m}.weight", f"net.res_blocks.{i}.{m}.bias"}
    return keys


CONNECTOR_KEYS = {"proj_gen.0.weight", "proj_gen.0.bias", "proj_gen.2.weight", "proj_gen.3.weight",
                  "proj_gen.3.bias", "pred_vit.0.weight", "pred_vit.0.bias", "pred_vit.2.weight", "pred_vit.2.bias",
                  "pred_vit.3.weight", "pred_vit.4.weight", "pred_vit.4.bias"}


@pytest.fixture(scope="module")
def decoder():
    return randomize_(ViTDecoder(target_channels=24, z_channels=24, width=32, depth=2), seed=1, std=0.2).eval()


@pytest.fixture(scope="module")
def planner():
    torch.manual_seed(0)
    model = PlannerModel.build(tiny_qwen_config(), num_mask_tokens=8, gen_dim=48, decoder_width=32,
                               decoder_depth=2, mllm_dtype=torch.float32)
    randomize_(model, seed=3, std=0.05)
    return model


def simple_branch(name, n_inputs, n_text, n_targets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = n_text + n_inputs + n_targets + 1
    vin = torch.zeros(length, dtype=torch.bool)
    vout = torch.zeros(length, dtype=torch.bool)
    vin[2:2 + n_inputs] = True
    vout[n_text + n_inputs:n_text + n_inputs + n_targets] = True
    mask = torch.full((length, length), float("-inf")).triu(1)
    positions = torch.stack([torch.arange(length), torch.arange(length) // 2, torch.arange(length) % 3])
    features = [torch.randn(n_inputs, HIDDEN, generator=gen)] if n_inputs else []
    return EncodedBranch(name=name, input_ids=torch.randint(3, 280, (length,), generator=gen),
                         token_types=vin.long() * 2 + vout.long() * 3, segment_ids=torch.arange(length),
                         visual_input_mask=vin, visual_output_mask=vout, attention_mask_4d=mask,
                         position_ids=positions, visual_inputs=features)


# --------------------------------------------------------------------------- connector

def test_connector_loads_official_key_names_strictly():
    conn = Connector(HIDDEN, 48, 40)
    assert set(conn.state_dict()) == CONNECTOR_KEYS
    shapes = {k: v.shape for k, v in conn.state_dict().items()}
    state = {k: torch.randn(shapes[k]) for k in CONNECTOR_KEYS}
    conn.load_state_dict(state, strict=True)
    assert torch.equal(conn.pred_vit[3].weight, state["pred_vit.3.weight"])
    with pytest.raises(RuntimeError):
        conn.load_state_dict({**state, "proj_gen.1.weight": torch.ones(1)}, strict=True)


def test_connector_full_size_shapes_match_spec():
    conn = Connector(3584, 4096, 3584, device="meta")
    shapes = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
    assert shapes["proj_gen.0.weight"] == (4096, 3584) and shapes["proj_gen.2.weight"] == (4096,)
    assert shapes["proj_gen.3.weight"] == (4096, 4096) and shapes["pred_vit.4.weight"] == (3584, 3584)
    assert sum(v.numel() for v in conn.state_dict().values()) == 3584 * 4096 + 4096 + 4096 + 4096 * 4096 + 4096 \
        + 3 * (3584 * 3584 + 3584) + 3584


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_connector_matches_transcription(dtype):
    conn = randomize_(Connector(HIDDEN, 48, 40), seed=5, std=0.2).to(dtype)
    h = torch.randn(1, 7, HIDDEN).to(dtype)
    for which, fn in (("proj_gen", conn.for_gen), ("pred_vit", conn.for_vit)):
        out, ref = fn(h), ref_connector(conn, h, which)
        assert out.dtype == dtype
        assert torch.equal(out, ref), (which, (out.float() - ref.float()).abs().max())
    # RMSNorm is computed in fp32 even for bf16 activations: a pure-bf16 norm gives different bits.
    x = torch.randn(4, 40).to(torch.bfloat16) * 7
    rough = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * conn.pred_vit[3].weight
    assert not torch.equal(conn.pred_vit[3](x), rough)


# --------------------------------------------------------------------------- ViT decoder

def test_decoder_loads_official_key_names_strictly():
    full = ViTDecoder(device="meta")  # 3584 / 4096 / depth 16 defaults of config.json (docs/official_behaviour.md §2.1)
    keys = set(full.state_dict())
    assert keys == decoder_keys(16) and len(keys) == 140
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes["net.res_blocks.0.adaLN_modulation.1.weight"] == (12288, 4096)
    assert shapes["net.final_layer.adaLN_modulation.1.weight"] == (8192, 4096)
    assert shapes["net.final_layer.linear.weight"] == (3584, 4096)
    assert shapes["net.time_embed.mlp.0.weight"] == (4096, 256)
    tiny = ViTDecoder(target_channels=24, z_channels=24, width=32, depth=2)
    state = {k: torch.randn(v.shape) for k, v in tiny.state_dict().items()}
    assert set(state) == decoder_keys(2)
    tiny.load_state_dict(state, strict=True)
    assert torch.equal(tiny.net.final_layer.linear.weight, state["net.final_layer.linear.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_net_matches_transcription(decoder, dtype):
    dec = ViTDecoder(target_channels=24, z_channels=24, width=32, depth=2)
    dec.load_state_dict(decoder.state_dict())
    dec = dec.to(dtype)
    x, c = torch.randn(5, 24).to(dtype), torch.randn(5, 24).to(dtype)
    t = torch.tensor([752.0]).to(dtype)
    out, ref = dec.net(x, t, c), ref_net(dec, x, t, c)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 20])
def test_sigma_schedule_is_bf16_transcription(steps):
    sigmas, timesteps, index = flow_match_schedule(steps)
    assert sigmas.dtype == torch.bfloat16 and timesteps.dtype == torch.bfloat16
    ref_sig, ref_ts = ref_sigmas(steps)
    assert sigmas.tolist() == ref_sig and timesteps.tolist() == ref_ts
    assert index == tuple(range(steps))


def test_sigma_schedule_literal_values():
    assert flow_match_schedule(1)[0].tolist() == [1.0] and flow_match_schedule(1)[1].tolist() == [1000.0]
    assert flow_match_schedule(3)[1].tolist() == [1000.0, 800.0, 504.0]
    assert flow_match_schedule(5)[1].tolist() == [1000.0, 892.0, 752.0, 572.0, 336.0]
    assert flow_match_schedule(5)[0].tolist() == [1.0, 0.890625, 0.75, 0.5703125, 0.3359375]


def test_sigma_schedule_coinciding_timesteps_use_first_nearest():
    sigmas, timesteps, index = flow_match_schedule(100)
    ts = timesteps.tolist()
    assert len(set(ts)) < 100  # bf16 makes some timesteps coincide at this step count
    for i, t in enumerate(ts):
        assert index[i] == ts.index(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("txt_cfg,img_cfg", [(1.2, 1.0), (1.5, 0.7), (1.4, None), (1.0, 1.2), (0.9, None)])
def test_sampler_matches_transcription(decoder, dtype, steps, txt_cfg, img_cfg):
    dec = ViTDecoder(target_channels=24, z_channels=24, width=32, depth=2)
    dec.load_state_dict(decoder.state_dict())
    dec = dec.to(dtype)
    gen = torch.Generator().manual_seed(steps)
    zc, zu, zi = (torch.randn(4, 24, generator=gen).to(dtype) for _ in range(3))
    noise = torch.randn(4, 24, generator=gen)
    out = dec.sample(zc, zu, zi, txt_cfg=txt_cfg, img_cfg=img_cfg, steps=steps, noise=noise)
    ref = ref_sample(dec, zc, zu, zi, txt_cfg, img_cfg, steps, noise)
    assert out.dtype == dtype and out.shape == (4, 24)
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()


def test_one_step_sample_is_noise_minus_velocity(decoder):
    zc = torch.randn(3, 24)
    noise = torch.randn(3, 24)
    out = decoder.sample(zc, None, None, txt_cfg=1.0, img_cfg=None, steps=1, noise=noise)
    v = decoder.net(noise, torch.tensor([1000.0]), zc)
    assert torch.equal(out, noise - v)  # σ 1 → 0: x + v·(0 − 1) is exactly x − v, the same net call gives v


def test_guidance_modes_differ(decoder):
    zc, zu, zi, noise = (torch.randn(3, 24) for _ in range(4))
    run = lambda txt, img: decoder.sample(zc, zu, zi, txt_cfg=txt, img_cfg=img, steps=2, noise=noise)
    three, two, none = run(1.3, 1.0), run(1.3, None), run(1.0, 1.0)
    assert not torch.allclose(three, two) and not torch.allclose(two, none)
    assert torch.equal(none, run(1.0, None))  # no guidance: uncond / imgcond conditions are ignored


def test_sampler_rejects_bad_noise_and_steps(decoder):
    z = torch.randn(2, 24)
    with pytest.raises(BerniniError, match="noise"):
        decoder.sample(z, z, z, txt_cfg=1.2, img_cfg=1.0, steps=2, noise=torch.randn(6, 24))
    with pytest.raises(BerniniError, match="vit_denoising_step"):
        decoder.sample(z, z, z, txt_cfg=1.2, img_cfg=1.0, steps=0, noise=torch.randn(2, 24))


# --------------------------------------------------------------------------- Qwen wrapper

def test_build_dtypes_and_prepare_heads():
    model = PlannerModel.build(tiny_qwen_config(), num_mask_tokens=8, gen_dim=48, decoder_width=32, decoder_depth=2)
    assert model.mllm.dtype == torch.bfloat16  # Qwen in the run dtype at load (docs/official_behaviour.md §7.3)
    assert all(p.dtype == torch.float32 for m in (model.connector, model.vit_decoder) for p in m.parameters())
    assert model.mask_tokens.dtype == torch.float32 and model.mask_tokens.shape == (1, 8, HIDDEN)
    assert set(k for k in model.state_dict() if not k.startswith("mllm.")) == (
        {"connector." + k for k in CONNECTOR_KEYS} | {"vit_decoder." + k for k in decoder_keys(2)} | {"mask_tokens"})
    weight = model.connector.pred_vit[0].weight.detach().clone()
    model.prepare_heads(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in (model.connector, model.vit_decoder) for p in m.parameters())
    assert torch.equal(model.connector.pred_vit[0].weight, weight.to(torch.bfloat16))
    assert model.mask_tokens.dtype == torch.float32  # copied into the embeddings per run, not cast


def test_flash_attention_is_refused():
    config = tiny_qwen_config()
    model = PlannerModel.build(config, num_mask_tokens=4, gen_dim=48, decoder_width=32, decoder_depth=1)
    model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(BerniniError, match="sdpa"):
        PlannerModel(model.mllm, model.connector, model.vit_decoder, model.mask_tokens)


def test_vision_features_are_merger_outputs_per_item(planner):
    grid = torch.tensor([[1, 4, 4], [2, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    feats = planner.vision_features(pixels, grid)
    assert [tuple(f.shape) for f in feats] == [(4, HIDDEN), (12, HIDDEN)]
    ref = planner.mllm.get_image_features(pixels, grid)  # transformers' own split merger output
    ref = getattr(ref, "pooler_output", ref)  # 5.x: an output object; 4.57: the tuple of per-image tensors
    for ours, theirs in zip(feats, ref):
        assert torch.equal(ours, theirs)


def test_input_embeds_scatter_features_and_mask_token(planner):
    branch = simple_branch("cond", n_inputs=5, n_text=6, n_targets=4, seed=1)
    embeds = planner.input_embeds(branch, dtype=torch.float32)
    table = planner.mllm.get_input_embeddings().weight
    text = ~(branch.visual_input_mask | branch.visual_output_mask)
    assert embeds.shape == (1, branch.length, HIDDEN)
    assert torch.equal(embeds[0, text], table[branch.input_ids[text]])
    assert torch.equal(embeds[0, branch.visual_input_mask], branch.visual_inputs[0])
    assert torch.equal(embeds[0, branch.visual_output_mask], planner.mask_tokens[0, :1].expand(4, -1))
    with pytest.raises(BerniniError, match="ViT features"):
        bad = simple_branch("cond", n_inputs=5, n_text=6, n_targets=4)
        bad.visual_inputs = [bad.visual_inputs[0][:3]]
        planner.input_embeds(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_is_hidden_states_minus_two(planner, dtype):
    branch = simple_branch("cond", n_inputs=5, n_text=6, n_targets=4, seed=2)
    branch.attention_mask_4d[-5:-1, -5:-1] = 0.0  # bidirectional target block, as the template builds it
    model = planner if dtype == torch.float32 else PlannerModel(
        _copy_qwen(planner).to(dtype), planner.connector, planner.vit_decoder, planner.mask_tokens)
    embeds = model.input_embeds(branch, dtype=dtype)
    ours = model.hidden(embeds, branch)
    mask = branch.attention_mask_4d.to(dtype)[None, None]
    ref = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=branch.position_ids[:, None],
                               output_hidden_states=True, use_cache=False).hidden_states[-2]
    assert ours.dtype == dtype and torch.equal(ours, ref)
    # the mask is honoured: earlier text rows cannot see the targets, target rows see each other
    changed = embeds.clone()
    changed[0, branch.visual_output_mask.nonzero()[-1]] += 1.0
    again = model.hidden(changed, branch)
    before = branch.visual_output_mask.nonzero()[0, 0]
    assert torch.equal(again[0, :before], ours[0, :before])
    assert not torch.equal(again[0, before], ours[0, before])


def _copy_qwen(planner):
    import copy

    return copy.deepcopy(planner.mllm)
