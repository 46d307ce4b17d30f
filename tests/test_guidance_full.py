"""Full-Bernini guidance modes vs formulas transcribed from docs/official_behaviour.md §4.7 (full Bernini part);
dtypes and call order, fixed v2v_apg settings and rejection from docs/official_behaviour.md §7.3 and §7.4.

The references are written from that text (explicit per-row / per-frame loops) and
call none of the module's helpers.
"""

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.sampling.guidance import RENDERER_MODES, APGConfig, Omegas, RendererGuidance
from bernini_core.sampling.guidance_full import FULL_MODES, FullArm, FullGuidance

SHAPE = (2, 4, 3, 4, 6)  # [B, C, T, H, W]; two batch rows so "per batch" projections are exercised

FULL = FullArm("wvae", "wtxt_wvit")
BASE = FullArm("wovae", "wotxt_wovit")
SRC = FullArm("wvae", "wotxt_wovit")
SRC_TXT = FullArm("wvae", "wtxt_wovit")
VID = FullArm("wvidvae", "wotxt_wovit")
ALL_ARMS = (FULL, BASE, SRC, SRC_TXT, VID, FullArm("wimgvae", "wotxt_wovit"))

POSITIVE = Omegas(vid=0.75, img=3.0, txt=4.0, tgt=1.5)  # v1 rv2v preset (docs/official_behaviour.md §5.1)
OMEGA_CASES = {
    "all": POSITIVE,
    "vid0": Omegas(vid=0.0, img=3.0, txt=4.0, tgt=1.5),
    "img0": Omegas(vid=0.75, img=0.0, txt=4.0, tgt=1.5),
    "txt0": Omegas(vid=0.75, img=3.0, txt=0.0, tgt=1.5),
    "tgt0": Omegas(vid=0.75, img=3.0, txt=4.0, tgt=0.0),
    "img0_txt0": Omegas(vid=0.75, img=0.0, txt=0.0, tgt=1.5),
    "all0": Omegas(vid=0.0, img=0.0, txt=0.0, tgt=0.0),
    "img_negative": Omegas(vid=0.75, img=-0.5, txt=4.0, tgt=1.5),  # official test is `ω > 0`
}


def random_arms(seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {arm: (scale * torch.randn(SHAPE, generator=gen)).to(dtype) for arm in ALL_ARMS}


def random_sample(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + seed))


def assert_close_rel(actual, expected, tol):
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert err <= tol, err
    return err


# Why 1e-5 for float32 results against the references (float64 ones, or float32 ones with another summation
# order): a guided velocity is ~10-12 float32 roundings deep (differences of arms, ω·δ, the projection's dot
# products over up to 288 elements or the per-frame norms, x-space σ·ε and back), with intermediates ω·δ up to
# ~3x max|out|, so the worst case is ~12·3·2^-24 ≈ 2e-6 of max|out|. Measured: chain modes vs float64 ≤ 2.7e-7
# here and ≤ 6.6e-7 over 200 random seeds; v2v_apg vs its transcription ≤ 2.1e-7 here, ≤ 3.6e-7 over 200 seeds
# (threads 1-4, ATEN_CPU_CAPABILITY default/avx2/avx512), which the former 1e-6 / 2e-6 bounds left only ~3-5x
# apart. A dropped or wrong term, a wrong η or threshold, or σ·ε not rounded to bf16 (2.6e-3) stay far above 1e-5.
FP32_TOL = 1e-5


# --------------------------------------------------------------------------- #
# Reference transcriptions of docs/official_behaviour.md §4.7 (full Bernini)
# --------------------------------------------------------------------------- #
def ref_project(delta, ref):
    """P(δ, ref) = 0.2·δ_∥ + 1.0·δ_⊥ over the whole flattened tensor of each batch row,
    ‖ref‖² floored at 1e-8, in the tensors' own dtype (step by step, docs/official_behaviour.md §7.3)."""
    out = torch.empty_like(delta)
    for b in range(delta.shape[0]):
        d, r = delta[b].reshape(-1), ref[b].reshape(-1)
        coeff = (d * r).sum() / (r * r).sum().clamp_min(1e-8)
        parallel = coeff * r
        out[b] = (0.2 * parallel + 1.0 * (d - parallel)).reshape(delta.shape[1:])
    return out


def ref_project_f64(delta, ref):
    """The same P with float64 dot products (dtype-independent check)."""
    out = torch.empty(delta.shape, dtype=torch.float64)
    for b in range(delta.shape[0]):
        d, r = delta[b].double().flatten(), ref[b].double().flatten()
        parallel = (d @ r) / (r @ r) * r
        out[b] = (0.2 * parallel + (d - parallel)).reshape(delta.shape[1:])
    return out


def ref_chain_mode(mode, e, w, project=ref_project):
    """docs/official_behaviour.md §4.7 formulas with every fall-back written out."""
    base, full = e[BASE], e[FULL]
    if mode in ("vae_txt_vit_wapg", "vae_txt_vit"):
        src = e[SRC] if w.img > 0 else base
        txt = e[SRC_TXT] if w.txt > 0 else src
        P = project if mode == "vae_txt_vit_wapg" else (lambda delta, ref: delta)
        return base + w.img * P(src - base, src) + w.txt * P(txt - src, txt) + w.tgt * P(full - txt, full)
    if mode == "rv2v_wapg":
        eps_v = e[VID] if w.vid > 0 else base
        eps_vi = e[SRC] if w.img > 0 else eps_v
        eps_vti = e[SRC_TXT] if w.txt > 0 else eps_vi
        eps_vtic = full if w.tgt > 0 else eps_vti
        return (base + w.vid * (eps_v - base) + w.img * (eps_vi - eps_v)
                + w.txt * (eps_vti - eps_vi) + w.tgt * (eps_vtic - eps_vti))
    raise AssertionError(mode)


def ref_v2v_apg(sample, sigma, e, w, threshold=50.0, eta=1.0):
    """docs/official_behaviour.md §4.7 / §7.4: x-space APG between ε(wovae, wotxt_wovit) and ε_full, η 1, momentum 0,
    threshold 50, scale ω_txt; σ·ε formed in the arm dtype (official float32 CPU σ × arm)."""
    sigma_t = torch.tensor(sigma, dtype=torch.float32)
    x_base = sample - sigma_t * e[BASE]
    x_cond = sample - sigma_t * e[FULL]
    diff = x_cond - x_base
    result = torch.empty_like(diff)
    for b in range(diff.shape[0]):
        for t in range(diff.shape[2]):
            d = diff[b, :, t]
            if threshold > 0:
                d = d * min(1.0, threshold / d.norm().item())
            d64, ref64 = d.double(), x_cond[b, :, t].double()
            unit = ref64 / ref64.norm()
            parallel = (d64 * unit).sum() * unit
            result[b, :, t] = (d64 - parallel).float() + eta * parallel.float()
    guided = x_base + w.txt * result
    return (sample - guided) / sigma_t


# --------------------------------------------------------------------------- #
# Chain modes
# --------------------------------------------------------------------------- #
CHAIN_MODES = ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg")


@pytest.mark.parametrize("case", list(OMEGA_CASES))
@pytest.mark.parametrize("mode", CHAIN_MODES)
def test_chain_modes_match_spec_fp32(mode, case):
    w = OMEGA_CASES[case]
    eps = random_arms(1)
    guidance = FullGuidance(mode)
    # Only the listed arms are handed over: reading a fall-back arm would raise KeyError.
    out = guidance.combine({a: eps[a] for a in guidance.arms(w)}, w)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref_chain_mode(mode, eps, w))
    exact = ref_chain_mode(mode, {a: x.double() for a, x in eps.items()}, w, project=ref_project_f64)
    assert_close_rel(out, exact, tol=FP32_TOL)


@pytest.mark.parametrize("case", ["all", "img0", "txt0", "tgt0", "vid0"])
@pytest.mark.parametrize("mode", CHAIN_MODES)
def test_chain_modes_bf16_arithmetic(mode, case):
    """docs/official_behaviour.md §7.3: bf16 arms → bf16 guided velocity, rounded step by step in the official order."""
    w = OMEGA_CASES[case]
    eps = random_arms(2, torch.bfloat16)
    out = FullGuidance(mode).combine(eps, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref_chain_mode(mode, eps, w))
    # computing in float32 and rounding once gives a different tensor: the check is bf16-sensitive
    once = ref_chain_mode(mode, {a: x.float() for a, x in eps.items()}, w).to(torch.bfloat16)
    if case == "all":
        assert not torch.equal(out, once)
    assert_close_rel(out, once, tol=3e-2)


@pytest.mark.parametrize("mode", ["vae_txt_vit_wapg", "vae_txt_vit"])
@pytest.mark.parametrize("field", ["img", "txt"])
def test_fall_back_differs_from_zero_weight(mode, field):
    """ω = 0 does not merely zero a rung: the next rung then differences against the previous one."""
    w = OMEGA_CASES[f"{field}0"]
    eps = random_arms(3)
    out = FullGuidance(mode).combine(eps, w)
    no_fall_back = {SRC: eps[SRC], SRC_TXT: eps[SRC_TXT]}
    base, full = eps[BASE], eps[FULL]
    P = ref_project if mode == "vae_txt_vit_wapg" else (lambda d, r: d)
    naive = (base + w.img * P(no_fall_back[SRC] - base, no_fall_back[SRC])
             + w.txt * P(no_fall_back[SRC_TXT] - no_fall_back[SRC], no_fall_back[SRC_TXT])
             + w.tgt * P(full - no_fall_back[SRC_TXT], full))
    assert not torch.allclose(out, naive, rtol=1e-3, atol=1e-3)


def test_rv2v_wapg_is_plain_differences_and_modes_differ():
    eps = random_arms(4)
    outs = {m: FullGuidance(m).combine(eps, POSITIVE) for m in CHAIN_MODES}
    assert not torch.allclose(outs["vae_txt_vit_wapg"], outs["vae_txt_vit"], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(outs["rv2v_wapg"], outs["vae_txt_vit"], rtol=1e-3, atol=1e-3)
    # no projection: linear in the arms
    doubled = FullGuidance("rv2v_wapg").combine({a: 2 * x for a, x in eps.items()}, POSITIVE)
    assert torch.equal(doubled, 2 * outs["rv2v_wapg"])  # x2 is exact in binary floating point: so is every rounding


def test_vae_txt_vit_modes_ignore_omega_vid():
    eps = random_arms(5)
    other = Omegas(vid=9.0, img=POSITIVE.img, txt=POSITIVE.txt, tgt=POSITIVE.tgt)
    for mode in ("vae_txt_vit_wapg", "vae_txt_vit"):
        g = FullGuidance(mode)
        assert torch.equal(g.combine(eps, POSITIVE), g.combine(eps, other))
        assert g.arms(other) == g.arms(POSITIVE) == g.arms(OMEGA_CASES["vid0"])


def test_projection_is_per_batch_row():
    """Row 1 of the output depends on row 1 of the arms only."""
    eps = random_arms(6)
    changed = {a: x.clone() for a, x in eps.items()}
    changed[SRC][0] *= 3.0
    g = FullGuidance("vae_txt_vit_wapg")
    a, b = g.combine(eps, POSITIVE), g.combine(changed, POSITIVE)
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])


def test_scaled_omegas_include_tgt():
    """omega_scale multiplies ω_tgt too in full Bernini (official cur_omega_tgt = omega_tgt·omega_scale)."""
    eps = random_arms(7)
    scaled = POSITIVE.scaled(0.75)
    assert scaled.tgt == POSITIVE.tgt * 0.75
    manual = Omegas(POSITIVE.vid * 0.75, POSITIVE.img * 0.75, POSITIVE.txt * 0.75, POSITIVE.tgt * 0.75)
    for mode in CHAIN_MODES:
        assert torch.equal(FullGuidance(mode).combine(eps, scaled), ref_chain_mode(mode, eps, manual))


# --------------------------------------------------------------------------- #
# v2v_apg
# --------------------------------------------------------------------------- #
def test_v2v_apg_matches_spec_and_threshold_is_active():
    # arms far apart: per-frame x-space diff norms ≈ σ·20·sqrt(2·96) ≈ 140 > 50
    eps, sample, sigma = random_arms(10, scale=20.0), random_sample(10), 0.5
    out = FullGuidance("v2v_apg").combine(eps, POSITIVE, sample=sample, sigma=sigma)
    assert out.dtype == torch.float32
    assert_close_rel(out, ref_v2v_apg(sample, sigma, eps, POSITIVE), tol=FP32_TOL)
    unclamped = ref_v2v_apg(sample, sigma, eps, POSITIVE, threshold=0.0)
    assert not torch.allclose(out, unclamped, rtol=1e-3, atol=1e-3)
    # small arms: threshold inactive, η = 1 → plain CFG in velocity space between base and ε_full
    eps, sample = random_arms(11, scale=0.1), random_sample(11)
    out = FullGuidance("v2v_apg").combine(eps, POSITIVE, sample=sample, sigma=0.8)
    assert_close_rel(out, eps[BASE] + POSITIVE.txt * (eps[FULL] - eps[BASE]), tol=1e-5)


def test_v2v_apg_ignores_caller_settings_and_keeps_no_momentum():
    """docs/official_behaviour.md §7.4: η 1.0, momentum 0, threshold 50 whatever the CLI says; no state across steps."""
    caller = APGConfig(eta=0.2, momentum=0.9, norm_threshold=(5.0, 5.0, 5.0))
    with_settings, default = FullGuidance("v2v_apg", caller), FullGuidance("v2v_apg")
    for step, sigma in enumerate((0.95, 0.7, 0.4)):
        eps, sample = random_arms(20 + step, scale=20.0), random_sample(20 + step)
        a = with_settings.combine(eps, POSITIVE, sample=sample, sigma=sigma)
        b = default.combine(eps, POSITIVE, sample=sample, sigma=sigma)
        assert torch.equal(a, b)
        assert_close_rel(a, ref_v2v_apg(sample, sigma, eps, POSITIVE), tol=FP32_TOL)
        assert not torch.allclose(a, ref_v2v_apg(sample, sigma, eps, POSITIVE, threshold=5.0, eta=0.2),
                                  rtol=1e-3, atol=1e-3)


def test_v2v_apg_bf16_arms():
    """σ·ε is rounded to bf16 (float32 CPU σ × bf16 arm), the x-space follows the float32 sample."""
    eps, sample, sigma = random_arms(30, torch.bfloat16, scale=20.0), random_sample(30), 0.75
    out = FullGuidance("v2v_apg").combine(eps, POSITIVE, sample=sample, sigma=sigma)
    assert out.dtype == torch.float32
    assert_close_rel(out, ref_v2v_apg(sample, sigma, eps, POSITIVE), tol=FP32_TOL)
    # bf16-sensitive: the same arms upcast before σ·ε give a measurably different answer
    upcast = {a: x.float() for a, x in eps.items()}
    assert not torch.equal(out, ref_v2v_apg(sample, sigma, upcast, POSITIVE))


def test_v2v_apg_needs_sigma_and_sample():
    g = FullGuidance("v2v_apg")
    assert g.uses_apg and not any(FullGuidance(m).uses_apg for m in CHAIN_MODES)
    with pytest.raises(BerniniError, match="UniPC"):
        g.combine(random_arms(0), POSITIVE, sample=random_sample(0), sigma=0.0)
    with pytest.raises(BerniniError, match="UniPC"):
        g.combine(random_arms(0), POSITIVE)


# --------------------------------------------------------------------------- #
# Arms, call order, names
# --------------------------------------------------------------------------- #
# docs/official_behaviour.md §7.4 order, fall-back arms left out; rv2v_wapg's recomputed ε_full is reused
EXPECTED_ARMS = {
    ("vae_txt_vit_wapg", "all"): [FULL, BASE, SRC, SRC_TXT],
    ("vae_txt_vit_wapg", "img0"): [FULL, BASE, SRC_TXT],
    ("vae_txt_vit_wapg", "txt0"): [FULL, BASE, SRC],
    ("vae_txt_vit_wapg", "tgt0"): [FULL, BASE, SRC, SRC_TXT],  # the ω_tgt rung never falls back
    ("vae_txt_vit_wapg", "img_negative"): [FULL, BASE, SRC_TXT],
    ("vae_txt_vit_wapg", "all0"): [FULL, BASE],
    ("rv2v_wapg", "all"): [FULL, BASE, VID, SRC, SRC_TXT],
    ("rv2v_wapg", "vid0"): [FULL, BASE, SRC, SRC_TXT],
    ("rv2v_wapg", "img0_txt0"): [FULL, BASE, VID],
    ("rv2v_wapg", "tgt0"): [BASE, VID, SRC, SRC_TXT],  # ε_full would be computed and discarded
    ("rv2v_wapg", "all0"): [BASE],
    ("v2v_apg", "all"): [FULL, BASE],
    ("v2v_apg", "all0"): [FULL, BASE],
}


@pytest.mark.parametrize("mode, case", list(EXPECTED_ARMS))
def test_arm_lists_and_order(mode, case):
    g = FullGuidance(mode)
    assert g.arms(OMEGA_CASES[case]) == EXPECTED_ARMS[(mode, case)]
    if mode == "vae_txt_vit_wapg":
        assert FullGuidance("vae_txt_vit").arms(OMEGA_CASES[case]) == EXPECTED_ARMS[(mode, case)]


def test_missing_arm_raises():
    g = FullGuidance("vae_txt_vit_wapg")
    partial = {a: torch.zeros(SHAPE) for a in g.arms(POSITIVE)[:-1]}
    with pytest.raises(KeyError):
        g.combine(partial, POSITIVE)


BERNINI_R_ONLY = [m for m in RENDERER_MODES if m not in FULL_MODES]  # v2v_apg exists in both


@pytest.mark.parametrize("name", BERNINI_R_ONLY + ["r2v_wapg", "default", "vae_txt"])
def test_bernini_r_and_unknown_names_rejected(name):
    with pytest.raises(BerniniError) as err:
        FullGuidance(name)
    message = str(err.value)
    assert name in message and all(mode in message for mode in FULL_MODES)
    if name in RENDERER_MODES:
        assert "Bernini-R" in message
    assert len(BERNINI_R_ONLY) == 6


def test_modes_tuple_and_vocabulary():
    assert FULL_MODES == ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg", "v2v_apg")
    for mode in FULL_MODES:
        if mode != "v2v_apg":  # the one name both families share, with different arms
            with pytest.raises(BerniniError):
                RendererGuidance(mode)
    with pytest.raises(ValueError):
        FullArm("VI", "wtxt_wvit")
    FullGuidance("rv2v_wapg").reset()  # stateless, callable for parity with RendererGuidance
