"""Wan 2.1 VAE vs diffusers AutoencoderKLWan, tiling, the original/ComfyUI key map and input checks.

References: docs/wan_qwen.md §2, docs/official_behaviour.md §4.1 (normalised latents, posterior mean) and §7.3 (VAE in
fp32).
"""

import types

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.keymaps.wan_vae import convert_vae_state_dict, vae_key_from_original, vae_key_to_original
from bernini_core.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig, WanVAE
from bernini_core.vae_tiling import TilingConfig

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=2, temperal_downsample=[False, True, True])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial gammas and biases too (diffusers initialises them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def stats():
    return torch.tensor(WAN21_LATENTS_MEAN).view(1, 16, 1, 1, 1), torch.tensor(WAN21_LATENTS_STD).view(1, 16, 1, 1, 1)


@pytest.fixture(scope="module")
def pair():
    """(diffusers AutoencoderKLWan, our WanVAE) with identical random tiny weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY).eval()
    randomize(ref)
    ours = WanVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def full_meta():
    """The full-size diffusers Wan 2.1 VAE on the meta device (names and shapes only, no memory)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan()


def video(frames=9, height=32, width=48, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def latents(frames=3, height=4, width=6, batch=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(batch, 16, frames, height, width, generator=g)


# ---- 1. parity with diffusers ------------------------------------------------------------------------
def test_config_from_diffusers_dict_and_defaults(full_meta):
    cfg = VAEConfig.from_dict({**TINY, "_class_name": "AutoencoderKLWan", "clip_output": True})
    assert cfg.dim_mult == (1, 2, 2, 2) and cfg.spatial_factor == 8 and cfg.temporal_factor == 4
    full, ref_full = VAEConfig(), full_meta
    assert list(full.latents_mean) == list(ref_full.config.latents_mean)
    assert list(full.latents_std) == list(ref_full.config.latents_std)
    assert VAEConfig.from_dict(dict(ref_full.config)) == full


def test_full_config_state_dict_matches_diffusers(full_meta):
    with torch.device("meta"):
        ours = WanVAE()
    ref = full_meta
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert len(a) == 194
    assert sum(v.numel() for v in ours.state_dict().values()) == 126_892_531  # docs/wan_qwen.md §2


@pytest.mark.parametrize("frames,batch", [(13, 1), (5, 2)])
def test_encode_matches_diffusers_mode(pair, frames, batch):
    ref, ours = pair
    x = video(frames, batch=batch)
    mean, std = stats()
    with torch.no_grad():
        mu = ref.encode(x).latent_dist.mode()
        got = ours.encode(x)
        raw = ours.encode_raw(x)
    assert got.shape == (batch, 16, 1 + (frames - 1) // 4, 4, 6)
    assert rel_err(got, (mu - mean) / std) < 1e-4
    assert rel_err(raw, mu) < 1e-4


@pytest.mark.parametrize("frames,batch", [(4, 1), (2, 2)])
def test_decode_matches_diffusers(pair, frames, batch):
    ref, ours = pair
    z = latents(frames, batch=batch)
    mean, std = stats()
    with torch.no_grad():
        expected = ref.decode(z * std + mean).sample
        got = ours.decode(z)
        raw = ours.decode_raw(z * std + mean)
    assert got.shape == (batch, 3, 1 + 4 * (frames - 1), 32, 48)
    assert (expected.abs() < 1).float().mean() > 0.9  # mostly unclamped, so the comparison bites
    assert rel_err(got, expected) < 1e-4
    assert rel_err(raw, expected) < 1e-4
    assert got.abs().max() <= 1.0


def test_causality_across_chunks(pair):
    """Frame t depends only on frames <= t: a prefix encodes/decodes to the prefix of the result."""
    _, ours = pair
    x, z = video(9), latents(3)
    with torch.no_grad():
        # exact: the prefix's chunks (first frame, then 4 frames; one latent frame at a time) run the same convs
        # on the same shapes whether or not more chunks follow
        assert torch.equal(ours.encode(x[:, :, :5]), ours.encode(x)[:, :, :2])
        assert torch.equal(ours.decode(z[:, :, :2]), ours.decode(z)[:, :, :5])


def test_bf16_runs_and_stays_close(pair):
    ref, ours = pair
    x, z = video(5), latents(2)
    half = WanVAE(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    half.to(torch.bfloat16)
    with torch.no_grad():
        enc32, dec32 = ref.encode(x).latent_dist.mode(), ref.decode(z).sample
        enc16, dec16 = half.encode_raw(x), half.decode_raw(z)
    assert enc16.dtype == dec16.dtype == torch.bfloat16
    assert rel_err(enc16.float(), enc32) < 0.05
    assert rel_err(dec16.float(), dec32) < 0.15  # bf16 through ~30 convs; diffusers' own bf16 error ~0.06


def test_layers_come_from_ops():
    made = []

    def recording(base):
        class Recorded(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        return Recorded

    ops = types.SimpleNamespace(Conv2d=recording(torch.nn.Conv2d), Conv3d=recording(torch.nn.Conv3d))
    vae = WanVAE(VAEConfig.from_dict(TINY), ops=ops)
    convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert convs and len(made) == len(convs) and all(any(m is c for m in made) for c in convs)


# ---- 2. tiling --------------------------------------------------------------------------------------
def test_tiling_matches_diffusers_tiling():
    """Same tile / stride as diffusers enable_tiling: same tiles, same blend, same result."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(3)
    ref = AutoencoderKLWan(**{**TINY, "num_res_blocks": 1}).eval()
    randomize(ref, 3)
    ours = WanVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)  # fmt: skip
    tiling = TilingConfig(tile_px=32, overlap_px=16)
    x, z = video(5, 48, 56), latents(2, 6, 7)  # 56 px: the last column of tiles is narrower
    with torch.no_grad():
        enc_err = rel_err(ours.encode_raw(x, tiling), ref.encode(x).latent_dist.mode())
        dec_err = rel_err(ours.decode_raw(z, tiling), ref.decode(z).sample)
    # Why these bounds: the decoders already differ untiled by fp32 summation order (~2e-6 here, up to 4.4e-6 in
    # test_decode_matches_diffusers, whose bound 1e-4 this reuses); tiled it measured 1.9e-6..2.2e-6 across thread
    # counts and ATEN_CPU_CAPABILITY, too close to 1e-5. Encoders: 1.9e-7..2.4e-7. A wrong tile grid or blend
    # measures 0.57 (encode) and 0.8..0.94 (decode), thousands of times the bounds.
    assert enc_err < 1e-5 and dec_err < 1e-4, (enc_err, dec_err)


def _make_local(model: torch.nn.Module) -> None:
    """Keep only the centre spatial tap of every kernel and silence the attention: each latent pixel then
    depends on its own 8x8 pixel block only, so any tiling must reproduce the untiled result exactly."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre
            if name.endswith("attentions.0"):
                m.proj.weight.zero_()
                m.proj.bias.zero_()


@pytest.mark.parametrize("tile,overlap", [(32, 16), (48, 16), (40, 0)])
def test_tiled_equals_untiled_for_a_local_network(pair, tile, overlap):
    _, ours = pair
    local = WanVAE(ours.config).eval()
    local.load_state_dict(ours.state_dict())
    _make_local(local)
    tiling = TilingConfig(tile_px=tile, overlap_px=overlap)
    x, z = video(5, 48, 64), latents(2, 6, 8)
    with torch.no_grad():
        enc_err = rel_err(local.encode(x, tiling), local.encode(x))
        dec_err = rel_err(local.decode(z, tiling), local.decode(z))
    assert enc_err < 1e-5 and dec_err < 1e-5, (enc_err, dec_err)


def test_tiling_not_used_when_frame_fits_one_tile(pair):
    _, ours = pair
    x = video(5)
    with torch.no_grad():
        assert torch.equal(ours.encode(x, TilingConfig(48, 16)), ours.encode(x))


# ---- 3. key map --------------------------------------------------------------------------------------
def test_key_map_round_trip_and_diffusers_converter(full_meta):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = full_meta.state_dict()
    original = {vae_key_to_original(k): v for k, v in sd.items()}
    assert len(original) == len(sd) == 194
    assert {vae_key_from_original(k) for k in original} == set(sd)
    spot_checks = {  # the table of docs/wan_qwen.md §2
        "decoder.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
        "decoder.upsamples.7.time_conv.bias": "decoder.up_blocks.1.upsamplers.0.time_conv.bias",
        "decoder.upsamples.14.residual.6.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.downsamples.2.residual.0.gamma": "encoder.down_blocks.2.norm1.gamma",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
        "decoder.head.0.gamma": "decoder.norm_out.gamma",
    }
    for original_key, ours_key in spot_checks.items():
        assert vae_key_from_original(original_key) == ours_key and vae_key_to_original(ours_key) == original_key
    # diffusers' own single-file converter (an independent implementation) agrees on every key
    assert set(convert_wan_vae_to_diffusers(original)) == set(sd)
    converted = convert_vae_state_dict(original)
    assert set(converted) == set(sd) and all(converted[vae_key_from_original(k)] is v for k, v in original.items())
    assert convert_vae_state_dict(sd).keys() == sd.keys()  # diffusers layout passes through
    prefixed = convert_vae_state_dict({"first_stage_model." + k: v for k, v in original.items()})
    assert set(prefixed) == set(sd)


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_original_layout_converts_and_loads_strict(pair, num_res_blocks):
    _, ours = pair
    cfg = VAEConfig.from_dict({**TINY, "num_res_blocks": num_res_blocks})
    source = WanVAE(cfg).eval()
    randomize(source, 5)
    original = {vae_key_to_original(k, num_res_blocks): v.clone() for k, v in source.state_dict().items()}
    target = WanVAE(cfg).eval()
    target.load_state_dict(convert_vae_state_dict(original), strict=True)
    z = latents(2, 4, 6)
    with torch.no_grad():
        assert torch.equal(target.decode(z), source.decode(z))


def test_unsupported_state_dicts_raise():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # Wan 2.2's 48-channel VAE in diffusers layout
        wan22 = AutoencoderKLWan(
            base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        ).state_dict()  # fmt: skip
    with pytest.raises(BerniniError, match="16-channel"):
        convert_vae_state_dict(wan22)
    wan22_original = {  # the original Wan 2.2 layout (vae2_2.py): nested down blocks, 48 channels
        "conv1.weight": torch.empty(96, 96, 1, 1, 1),
        "conv2.weight": torch.empty(48, 48, 1, 1, 1),
        "encoder.conv1.weight": torch.empty(160, 12, 3, 3, 3),
        "encoder.downsamples.0.downsamples.0.residual.0.gamma": torch.empty(160, 1, 1, 1),
    }
    with pytest.raises(BerniniError, match="16-channel"):
        convert_vae_state_dict(wan22_original)
    with pytest.raises(BerniniError, match="not a Wan VAE"):
        convert_vae_state_dict({"model.diffusion_model.blocks.0.weight": torch.empty(1)})
    with pytest.raises(BerniniError):
        vae_key_from_original("encoder.upsamples.0.residual.0.gamma")
    with pytest.raises(BerniniError):
        vae_key_to_original("decoder.up_blocks.4.resnets.0.conv1.weight")
    with pytest.raises(BerniniError, match="16-channel"):
        VAEConfig.from_dict({"z_dim": 48, "is_residual": True, "patch_size": 2})


# ---- 4. input checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,match",
    [((1, 3, 8, 64, 64), "1 \\+ 4k frames"), ((1, 3, 0, 64, 64), "frames"), ((1, 3, 5, 60, 64), "multiples of 8"),
     ((1, 3, 5, 64, 36), "multiples of 8"), ((1, 4, 5, 64, 64), r"\[B, 3, F, H, W\]"), ((3, 5, 64, 64), r"\[B, 3")],
)  # fmt: skip
def test_bad_video_shapes_raise(pair, shape, match):
    _, ours = pair
    with pytest.raises(BerniniError, match=match):
        ours.encode(torch.zeros(shape))
    with pytest.raises(BerniniError, match=match):
        ours.encode(torch.zeros(shape), TilingConfig(32, 16))


def test_bad_latents_and_tiling_settings_raise(pair):
    _, ours = pair
    with pytest.raises(BerniniError, match="16"):
        ours.decode(torch.zeros(1, 15, 2, 4, 4))
    with pytest.raises(BerniniError, match="16"):
        ours.decode_raw(torch.zeros(16, 2, 4, 4))
    for tile, overlap in [(250, 64), (256, 60), (256, 256), (256, 300), (256, -8), (8, 0)]:
        with pytest.raises(BerniniError, match="tiling"):
            TilingConfig(tile, overlap)
    assert TilingConfig().stride_px == 192
