"""Bernini-R guidance modes vs formulas transcribed from docs/official_behaviour.md §4.7, §7.3, §7.4.

The references below are written from that text with explicit per-frame loops;
they do not call the module's helpers.
"""

import math

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.sampling.guidance import (
    RENDERER_MODES,
    APGConfig,
    Arm,
    Omegas,
    RendererGuidance,
    flat_project,
)

SHAPE = (1, 4, 3, 4, 6)  # [B, C, T, H, W]
OMEGAS = Omegas(vid=1.25, img=4.5, txt=4.0, tgt=0.5)

A = {name: Arm(*name.split("/")) for name in
     ("none/neg", "none/pos", "V/neg", "I/neg", "I/pos", "VI/neg", "VI/pos")}


def random_arms(seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {arm: (scale * torch.randn(SHAPE, generator=gen)).to(dtype) for arm in A.values()}


def random_sample(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + seed))


# --------------------------------------------------------------------------- #
# Reference transcriptions
# --------------------------------------------------------------------------- #
def ref_plain(mode, e, w):
    """docs/official_behaviour.md §4.7 table, plain CFG rows."""
    n, np_, v, vi, vip = (e[A["none/neg"]], e[A["none/pos"]], e[A["V/neg"]], e[A["VI/neg"]], e[A["VI/pos"]])
    if mode == "rv2v":
        return n + w.vid * (v - n) + w.img * (vi - v) + w.txt * (vip - vi)
    if mode == "v2v":
        return vi + w.txt * (vip - vi)
    if mode == "v2v_chain":
        return n + w.vid * (v - n) + w.txt * (vip - v)
    if mode == "t2v":
        return n + w.txt * (np_ - n)
    raise AssertionError(mode)


class RefAPG:
    """APG paragraph of docs/official_behaviour.md §4.7, frame by frame: x̂ = x_t − σ·ε; diff = x̂_cond − x̂_prev;
    r ← diff + momentum·r; if thr > 0: diff ·= min(1, thr/‖diff‖_frame); project on
    unit(x̂_cond) per frame in float64: diff_⊥ + η·diff_∥; x̂ = x̂_base + Σ scale·result;
    ε̂ = (x_t − x̂)/σ."""

    def __init__(self, eta, momentum, thresholds):
        self.eta, self.momentum, self.thresholds = eta, momentum, thresholds
        self.running = {}

    def rung(self, i, diff, ref):
        r = diff + self.momentum * self.running.get(i, torch.zeros_like(diff))
        self.running[i] = r
        out = torch.empty_like(r)
        for b in range(r.shape[0]):
            for t in range(r.shape[2]):
                d = r[b, :, t]
                if self.thresholds[i] > 0:
                    d = d * min(1.0, self.thresholds[i] / d.norm().item())
                d64, ref64 = d.double(), ref[b, :, t].double()
                unit = ref64 / ref64.norm()
                par = (d64 * unit).sum() * unit
                out[b, :, t] = (d64 - par).float() + self.eta * par.float()
        return out

    def __call__(self, sample, sigma, chain, scales):
        xs = [sample - sigma * e.float() for e in chain]
        guided = xs[0]
        for i, scale in enumerate(scales):
            guided = guided + scale * self.rung(i, xs[i + 1] - xs[i], xs[i + 1])
        return (sample - guided) / sigma


def apg_chain_for(mode, e, w):
    if mode == "r2v_apg":
        return [e[A["none/neg"]], e[A["I/neg"]], e[A["I/pos"]]], [w.img, w.txt]
    if mode == "v2v_apg":
        return [e[A["VI/neg"]], e[A["VI/pos"]]], [w.txt]
    if mode == "t2v_apg":
        return [e[A["none/neg"]], e[A["none/pos"]]], [w.txt]
    raise AssertionError(mode)


def assert_close_rel(actual, expected, tol=1e-5):
    """Why 1e-5: the float32 APG path is ~12 roundings deep (σ·ε, x-space differences, per-frame norms, the
    projection cast back from float64, scale·δ, x → ε) with intermediates up to ~3x max|out|: worst case
    ~12·3·2^-24 ≈ 2e-6 of max|out|. Measured ≤ 9.5e-8 on these seeds (threads 1-4, ATEN_CPU_CAPABILITY
    default/avx2/avx512) but up to 4.7e-7 over 1800 random draws, too close to the former 2e-6; a wrong η,
    threshold, momentum or scale is off by O(1)."""
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert err <= tol, err


# --------------------------------------------------------------------------- #
# Plain CFG modes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", ["rv2v", "v2v", "v2v_chain", "t2v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_modes_match_spec(mode, dtype):
    eps = random_arms(1, dtype)
    guidance = RendererGuidance(mode)
    out = guidance.combine(eps, OMEGAS, sample=random_sample(1), sigma=0.7)
    assert out.dtype == dtype  # docs/official_behaviour.md §7.3: plain CFG modes stay in the arms' dtype
    assert torch.equal(out, ref_plain(mode, eps, OMEGAS))
    # only the listed arms are read
    only = {arm: eps[arm] for arm in guidance.arms(OMEGAS)}
    assert torch.equal(guidance.combine(only, OMEGAS, sample=random_sample(1), sigma=0.7), out)


def test_plain_mode_is_not_a_trivial_function():
    eps = random_arms(2)
    outs = [RendererGuidance(m).combine(eps, OMEGAS, sample=random_sample(2), sigma=0.5)
            for m in ("rv2v", "v2v", "v2v_chain", "t2v")]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j])


# --------------------------------------------------------------------------- #
# APG modes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", ["r2v_apg", "v2v_apg", "t2v_apg"])
def test_apg_modes_match_spec(mode):
    cfg = APGConfig(eta=0.5, momentum=0.0, norm_threshold=(50.0, 50.0, 50.0))
    guidance = RendererGuidance(mode, cfg)
    ref = RefAPG(0.5, 0.0, [50.0, 50.0])
    for step, sigma in enumerate((0.9, 0.6)):
        eps, sample = random_arms(10 + step), random_sample(10 + step)
        out = guidance.combine(eps, OMEGAS, sample=sample, sigma=sigma)
        assert out.dtype == torch.float32
        chain, scales = apg_chain_for(mode, eps, OMEGAS)
        assert_close_rel(out, ref(sample, sigma, chain, scales))


@pytest.mark.parametrize("mode", ["r2v_apg", "v2v_apg"])
def test_apg_momentum_carries_across_steps(mode):
    cfg = APGConfig(eta=0.3, momentum=0.5, norm_threshold=(0.0,))
    guidance = RendererGuidance(mode, cfg)
    ref = RefAPG(0.3, 0.5, [0.0, 0.0])
    steps = [(random_arms(20 + k), random_sample(20 + k), s) for k, s in enumerate((0.95, 0.8, 0.6))]
    for k, (eps, sample, sigma) in enumerate(steps):
        out = guidance.combine(eps, OMEGAS, sample=sample, sigma=sigma)
        chain, scales = apg_chain_for(mode, eps, OMEGAS)
        assert_close_rel(out, ref(sample, sigma, chain, scales))
        fresh = RendererGuidance(mode, cfg).combine(eps, OMEGAS, sample=sample, sigma=sigma)
        if k == 0:
            assert torch.equal(out, fresh)
        else:
            assert not torch.allclose(out, fresh, rtol=1e-3, atol=1e-3)
    guidance.reset()
    eps, sample, sigma = steps[1]
    assert torch.equal(
        guidance.combine(eps, OMEGAS, sample=sample, sigma=sigma),
        RendererGuidance(mode, cfg).combine(eps, OMEGAS, sample=sample, sigma=sigma),
    )


def test_apg_zero_momentum_is_memoryless():
    guidance = RendererGuidance("t2v_apg", APGConfig(momentum=0.0))
    first = (random_arms(30), random_sample(30), 0.9)
    second = (random_arms(31), random_sample(31), 0.7)
    guidance.combine(first[0], OMEGAS, sample=first[1], sigma=first[2])
    out = guidance.combine(second[0], OMEGAS, sample=second[1], sigma=second[2])
    fresh = RendererGuidance("t2v_apg").combine(second[0], OMEGAS, sample=second[1], sigma=second[2])
    assert torch.equal(out, fresh)


@pytest.mark.parametrize("mode", ["r2v_apg", "t2v_apg"])
def test_norm_threshold_active_and_inactive(mode):
    # arms far apart: per-frame x-space diff norms are ~ σ·20·sqrt(C·H·W) ≈ 100 > 5
    eps, sample, sigma = random_arms(40, scale=20.0), random_sample(40), 0.5

    def run(threshold):
        return RendererGuidance(mode, APGConfig(norm_threshold=threshold)).combine(
            eps, OMEGAS, sample=sample, sigma=sigma)

    disabled, huge, clamped = run(0.0), run(1e9), run(5.0)
    assert torch.equal(disabled, huge)
    assert not torch.allclose(disabled, clamped, rtol=1e-3, atol=1e-3)
    chain, scales = apg_chain_for(mode, eps, OMEGAS)
    assert_close_rel(clamped, RefAPG(0.5, 0.0, [5.0, 5.0])(sample, sigma, chain, scales))
    assert_close_rel(disabled, RefAPG(0.5, 0.0, [0.0, 0.0])(sample, sigma, chain, scales))


def test_r2v_threshold_per_rung():
    """r2v_apg: rung 0 uses norm_threshold[0], rung 1 uses [1]; one value serves both."""
    eps, sample, sigma = random_arms(50, scale=20.0), random_sample(50), 0.5
    chain, scales = apg_chain_for("r2v_apg", eps, OMEGAS)

    def run(threshold):
        return RendererGuidance("r2v_apg", APGConfig(norm_threshold=threshold)).combine(
            eps, OMEGAS, sample=sample, sigma=sigma)

    assert_close_rel(run((5.0, 200.0, 1.0)), RefAPG(0.5, 0.0, [5.0, 200.0])(sample, sigma, chain, scales))
    assert_close_rel(run((7.0,)), RefAPG(0.5, 0.0, [7.0, 7.0])(sample, sigma, chain, scales))
    assert torch.equal(run(7.0), run((7.0, 7.0)))
    # single-condition modes read element 0 only
    single = lambda th: RendererGuidance("v2v_apg", APGConfig(norm_threshold=th)).combine(
        eps, OMEGAS, sample=sample, sigma=sigma)
    assert torch.equal(single((5.0, 1.0, 1.0)), single((5.0,)))


def test_apg_eta_changes_parallel_part():
    eps, sample = random_arms(60), random_sample(60)
    outs = [RendererGuidance("v2v_apg", APGConfig(eta=eta)).combine(eps, OMEGAS, sample=sample, sigma=0.8)
            for eta in (0.0, 0.5, 1.0)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    # η = 1 and no threshold: plain CFG in x-space, i.e. plain CFG in velocity space
    plain = RendererGuidance("v2v_apg", APGConfig(eta=1.0, norm_threshold=0.0)).combine(
        eps, OMEGAS, sample=sample, sigma=0.8)
    assert_close_rel(plain, ref_plain("v2v", eps, OMEGAS), tol=1e-5)


def test_apg_bf16_arms_give_float32():
    """docs/official_behaviour.md §7.3: APG modes return float32; σ·ε is formed in the arm dtype (the official
    multiplies a float32 CPU scalar σ by the bf16 arm) and the rest runs in float32."""
    eps = random_arms(70, torch.bfloat16)
    sample, sigma = random_sample(70), 0.75
    out = RendererGuidance("t2v_apg").combine(eps, OMEGAS, sample=sample, sigma=sigma)
    assert out.dtype == torch.float32
    rounded = {arm: (sigma * e.float()).to(torch.bfloat16).float() / sigma for arm, e in eps.items()}
    chain, scales = apg_chain_for("t2v_apg", rounded, OMEGAS)
    assert_close_rel(out, RefAPG(0.5, 0.0, [50.0])(sample, sigma, chain, scales), tol=1e-5)


def test_apg_rejects_zero_sigma():
    with pytest.raises(BerniniError, match="UniPC"):
        RendererGuidance("t2v_apg").combine(random_arms(0), OMEGAS, sample=random_sample(0), sigma=0.0)
    assert RendererGuidance("t2v_apg").uses_apg and not RendererGuidance("t2v").uses_apg


# --------------------------------------------------------------------------- #
# Arms, omegas, modes
# --------------------------------------------------------------------------- #
EXPECTED_ARMS = {  # docs/official_behaviour.md §7.4 call order
    "rv2v": ["none/neg", "V/neg", "VI/neg", "VI/pos"],
    "v2v": ["VI/neg", "VI/pos"],
    "v2v_chain": ["none/neg", "V/neg", "VI/pos"],
    "t2v": ["none/neg", "none/pos"],
    "r2v_apg": ["none/neg", "I/neg", "I/pos"],
    "v2v_apg": ["VI/neg", "VI/pos"],
    "t2v_apg": ["none/neg", "none/pos"],
}


@pytest.mark.parametrize("mode", RENDERER_MODES)
def test_arm_order_and_no_zero_omega_skips(mode):
    guidance = RendererGuidance(mode)
    expected = [A[name] for name in EXPECTED_ARMS[mode]]
    assert guidance.arms(OMEGAS) == expected
    # The official Bernini-R sample() runs every arm whatever the omegas.
    assert guidance.arms(Omegas(vid=0.0, img=0.0, txt=0.0, tgt=0.0)) == expected
    missing = {arm: torch.zeros(SHAPE) for arm in expected[:-1]}
    with pytest.raises(KeyError):
        guidance.combine(missing, OMEGAS, sample=torch.zeros(SHAPE), sigma=0.5)


def test_modes_tuple_and_unknown_mode():
    assert RENDERER_MODES == ("rv2v", "v2v", "v2v_chain", "t2v", "r2v_apg", "v2v_apg", "t2v_apg")
    with pytest.raises(BerniniError) as err:
        RendererGuidance("vae_txt_vit_wapg")
    for mode in RENDERER_MODES:
        assert mode in str(err.value)
    assert "vae_txt_vit_wapg" in str(err.value)


def test_omegas_scaled():
    w = Omegas(vid=1.25, img=4.5, txt=4.0, tgt=0.5).scaled(0.8)
    assert (w.vid, w.img, w.txt, w.tgt) == (1.25 * 0.8, 4.5 * 0.8, 4.0 * 0.8, 0.5 * 0.8)
    assert Omegas(1.0, 2.0, 3.0).tgt == 0.5


def test_apg_config_defaults():
    cfg = APGConfig()
    assert (cfg.eta, cfg.momentum, cfg.norm_threshold) == (0.5, 0.0, (50.0, 50.0, 50.0))
    assert APGConfig(norm_threshold=3).norm_threshold == (3.0,)
    with pytest.raises(BerniniError):
        APGConfig(norm_threshold=())


def test_flat_project_matches_spec():
    """docs/official_behaviour.md §4.7 full Bernini: P(δ, ref) = 0.2·δ_∥ + 1.0·δ_⊥ over the whole flattened tensor per
    batch."""
    gen = torch.Generator().manual_seed(80)
    delta, ref = torch.randn((2,) + SHAPE[1:], generator=gen), torch.randn((2,) + SHAPE[1:], generator=gen)
    out = flat_project(delta, ref)
    for b in range(2):
        d, r = delta[b].flatten().double(), ref[b].flatten().double()
        par = (d @ r) / (r @ r) * r
        expected = 0.2 * par + (d - par)
        assert_close_rel(out[b].flatten(), expected, tol=1e-5)
    # orthogonal part untouched, parallel part scaled
    assert math.isclose(float((flat_project(ref, ref) / ref).mean()), 0.2, rel_tol=1e-5)
