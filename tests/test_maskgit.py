"""The MaskGIT planning loop (docs/official_behaviour.md §3.5, §3.7, §7.1 items 2–3, §7.2).

References: a literal transcription of the official ``sample_vit_embed`` loop written here (torch mask
tensors, scatter / xor, the ``nonzero().sum() == 0`` skip, all three forwards every step through the top-level
transformers Qwen model with ``output_hidden_states=True``) drawing from the global generators seeded the official
way, hand-computed mask lengths, and the global RNG streams advanced by hand; ``plan`` draws from its own
``PlannerRng`` seeded alike, so equal results also show its generators reproduce the global ones.
"""

import math

import numpy as np
import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.planner.branch import EncodedBranch
from bernini_core.planner.maskgit import PlannerContexts, mask_lengths, mask_schedule, plan
from bernini_core.planner.model import PlannerModel
from bernini_core.planner.rng import PlannerRng

HIDDEN, VIT_DIM, GEN_DIM = 64, 64, 48
DTYPE = torch.bfloat16  # the official planning dtype (docs/official_behaviour.md §7.3)


# --------------------------------------------------------------------------- helpers

def tiny_qwen_config():
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0)
    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=HIDDEN,
                  spatial_merge_size=2, patch_size=14, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0], in_chans=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                            vision_start_token_id=289, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    planner = PlannerModel.build(tiny_qwen_config(), num_mask_tokens=32, gen_dim=GEN_DIM, decoder_width=32,
                                 decoder_depth=2, mllm_dtype=DTYPE)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in planner.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return planner


def make_branch(name, *, n_text, n_inputs, n_targets, seed):
    """Text, then visual inputs, then the target block and one closing token; causal mask, with the target
    block bidirectional (docs/official_behaviour.md §3.3); simple M-RoPE ids."""
    gen = torch.Generator().manual_seed(seed)
    length = n_text + n_inputs + n_targets + 1
    vin = torch.zeros(length, dtype=torch.bool)
    vout = torch.zeros(length, dtype=torch.bool)
    vin[n_text:n_text + n_inputs] = True
    vout[n_text + n_inputs:n_text + n_inputs + n_targets] = True
    mask = torch.full((length, length), float("-inf")).triu(1)
    block = slice(n_text + n_inputs, n_text + n_inputs + n_targets)
    mask[block, block] = 0.0
    positions = torch.stack([torch.arange(length), torch.arange(length) + 1, torch.arange(length) // 2])
    return EncodedBranch(
        name=name, input_ids=torch.randint(3, 280, (length,), generator=gen),
        token_types=vin.long() * 2 + vout.long() * 3, segment_ids=torch.arange(length),
        visual_input_mask=vin, visual_output_mask=vout, attention_mask_4d=mask, position_ids=positions,
        visual_inputs=[torch.randn(n_inputs, HIDDEN, generator=gen)] if n_inputs else [])


def make_branches(n_targets):
    return {
        "cond": make_branch("cond", n_text=7, n_inputs=6, n_targets=n_targets, seed=1),
        "imgcond": make_branch("imgcond", n_text=7, n_inputs=0, n_targets=n_targets, seed=2),
        "uncond": make_branch("uncond", n_text=5, n_inputs=0, n_targets=n_targets, seed=3),
    }


def run(model, branches, seed, rng=None, **kw):
    args = dict(planning_step=4, vit_denoising_step=2, vit_txt_cfg=1.2, vit_img_cfg=1.0, dtype=DTYPE, device="cpu")
    args.update(kw)
    return plan(model, branches, rng=rng or PlannerRng.from_seed(seed), **args)


def official_plan(model, branches, *, planning_step, vit_denoising_step, vit_txt_cfg, vit_img_cfg, dtype):
    """Literal transcription of pipeline.py ``__call__`` (embeddings) + ``sample_vit_embed``."""
    embed = model.mllm.get_input_embeddings()
    inputs = {}
    for name in ("cond", "imgcond", "uncond"):
        b = branches[name]
        e = embed(b.input_ids[None]).to(dtype)
        visual = b.visual_input_mask | b.visual_output_mask
        placeholder = torch.zeros(b.n_target_tokens, HIDDEN)  # target ViT features: overwritten below
        features = torch.cat(list(b.visual_inputs) + [placeholder]).to(dtype)
        e = e.masked_scatter(visual[None, :, None].expand_as(e), features)
        targets = e[:, b.visual_output_mask, :]
        targets[:, :, :] = model.mask_tokens[:, :1].expand(1, b.n_target_tokens, -1)
        e[:, b.visual_output_mask, :] = targets
        inputs[name] = (e, b.position_ids[None].transpose(0, 1).contiguous(), b.attention_mask_4d[None, None],
                        b.visual_output_mask)

    def forward(name):
        e, pos, mask, _ = inputs[name]
        out = model.mllm(inputs_embeds=e.clone(), position_ids=pos.clone(), attention_mask=mask.to(dtype),
                         output_hidden_states=True, use_cache=False)
        return out.hidden_states[-2]

    vo = inputs["cond"][3]
    n = int(vo.sum())
    order = np.array(list(range(n)))
    np.random.shuffle(order)
    order = torch.Tensor(np.array(order)).long()
    mask = torch.ones(n)
    for step in range(planning_step):
        h = {name: forward(name) for name in ("cond", "uncond", "imgcond")}
        z = {name: model.connector.for_vit(h[name][:, inputs[name][3], :]) for name in h}
        ratio = np.cos(math.pi / 2.0 * (step + 1) / planning_step)
        mask_len = torch.Tensor([np.floor(n * ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
        mask_next = torch.scatter(torch.zeros_like(mask), -1, order[: mask_len.long()], torch.ones_like(mask)).bool()
        mask_to_pred = mask.bool() if step >= planning_step - 1 else torch.logical_xor(mask.bool(), mask_next)
        mask = mask_next
        if mask_to_pred.nonzero(as_tuple=True)[0].sum() == 0:
            continue
        idx = mask_to_pred.nonzero(as_tuple=True)[0]
        noise = torch.randn(len(idx), VIT_DIM)
        pred = model.vit_decoder.sample(z["cond"][0, idx], z["uncond"][0, idx], z["imgcond"][0, idx],
                                        txt_cfg=vit_txt_cfg, img_cfg=vit_img_cfg, steps=vit_denoising_step,
                                        noise=noise)[None].to(dtype)
        all_targets = inputs["cond"][0][:, vo, :]
        all_targets[:, idx] = pred
        for name in inputs:
            inputs[name][0][:, inputs[name][3]] = all_targets
    ctx = {}
    for name in ("cond", "uncond"):
        h = forward(name)
        keep = torch.ones(h.shape[1], dtype=torch.bool)
        ctx[name] = model.connector.for_gen(h[:, keep, :])
    vo_u = inputs["uncond"][3]
    return dict(wtxt_wvit=ctx["cond"], wtxt_wovit=ctx["cond"][:, ~vo], wotxt_wvit=ctx["cond"][:, vo],
                wotxt_wovit=ctx["uncond"][:, ~vo_u], planned_vit=inputs["cond"][0][:, vo, :])


def numpy_seed_giving(order_prefix, n, limit=2000):
    for seed in range(limit):
        np.random.seed(seed)
        order = np.arange(n)
        np.random.shuffle(order)
        if list(order[:len(order_prefix)]) == order_prefix:
            return seed
    raise AssertionError("no seed found")


# --------------------------------------------------------------------------- mask schedule

def official_schedule(n, steps, order):
    """The official mask bookkeeping, transcribed with torch tensors; returns (mask lengths, predicted)."""
    order_t = torch.tensor(order).long()
    mask = torch.ones(n)
    lengths, predicted = [], []
    for step in range(steps):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / steps)
        mask_len = torch.Tensor([np.floor(n * ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
        mask_next = torch.scatter(torch.zeros_like(mask), -1, order_t[: mask_len.long()], torch.ones_like(mask)).bool()
        to_pred = mask.bool() if step >= steps - 1 else torch.logical_xor(mask.bool(), mask_next)
        mask = mask_next.float()
        lengths.append(int(mask_len.item()))
        idx = to_pred.nonzero(as_tuple=True)[0]
        predicted.append([] if idx.sum() == 0 else idx.tolist())
    return lengths, predicted


def test_mask_lengths_hand_values():
    # N=8, S=4: floor(8·cos(π/8))=7, floor(8·cos(π/4))=5, floor(8·cos(3π/8))=3, last: max(1, min(2, 0)) = 1
    assert mask_lengths(8, 4) == [7, 5, 3, 1]
    # N=300, S=25: first step floor(300·cos(π/50)) = 299 capped at 299; the last one always 1
    lengths = mask_lengths(300, 25)
    assert lengths[0] == 299 and lengths[1] == min(298, math.floor(300 * math.cos(math.pi / 25))) and lengths[-1] == 1
    assert mask_lengths(1, 3) == [1, 1, 1]
    assert mask_lengths(5, 1) == [1]


def test_mask_schedule_identity_order_hand_values():
    assert mask_schedule(8, 4) == [[7], [5, 6], [3, 4], [0, 1, 2]]
    # the last step predicts every token still masked; here that is {0} -> skipped (docs/official_behaviour.md §7.2
    # quirk)
    assert mask_schedule(2, 3) == [[1], [], []]
    assert mask_schedule(1, 4) == [[], [], [], []]  # N = 1: the only token is 0, never predicted
    assert mask_schedule(5, 1) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("n,steps", [(8, 4), (64, 25), (300, 25), (300, 50), (60, 5), (3, 10), (2, 3), (1, 2),
                                     (17, 17), (1024, 50)])
def test_mask_schedule_matches_official_bookkeeping(n, steps):
    rng = np.random.default_rng(n * 100 + steps)
    for _ in range(4):
        order = rng.permutation(n)
        lengths, predicted = official_schedule(n, steps, order)
        assert mask_lengths(n, steps) == lengths
        assert mask_schedule(n, steps, order) == predicted
        revealed = [i for step in predicted for i in step]
        assert len(revealed) == len(set(revealed))


def test_skip_quirk_token_zero_alone_at_an_intermediate_step():
    # N=3, S=3: lengths [2, 1, 1]; step 1 predicts order[1:2]. With order [2, 0, 1] that is {0}: skipped.
    assert mask_lengths(3, 3) == [2, 1, 1]
    assert mask_schedule(3, 3, [2, 0, 1]) == [[1], [], [2]]
    assert mask_schedule(3, 3, [0, 2, 1]) == [[1], [2], []]  # last step {0}: skipped too
    assert mask_schedule(3, 3, [1, 0, 2]) == [[2], [], [1]]


def test_mask_schedule_rejects_bad_input():
    with pytest.raises(BerniniError):
        mask_schedule(0, 3)
    with pytest.raises(BerniniError):
        mask_schedule(4, 0)
    with pytest.raises(BerniniError):
        mask_schedule(3, 2, [0, 0, 1])


# --------------------------------------------------------------------------- plan()

@pytest.mark.parametrize("n_targets,steps,vsteps,txt,img", [(8, 4, 2, 1.2, 1.0), (6, 3, 1, 1.4, None),
                                                           (5, 2, 3, 1.0, 1.0), (9, 25, 1, 1.2, 1.0)])
def test_plan_equals_official_transcription(model, n_targets, steps, vsteps, txt, img):
    branches = make_branches(n_targets)
    kw = dict(planning_step=steps, vit_denoising_step=vsteps, vit_txt_cfg=txt, vit_img_cfg=img)
    ours = run(model, branches, seed=11, **kw)
    np.random.seed(11)
    torch.manual_seed(11)
    ref = official_plan(model, branches, dtype=DTYPE, **kw)
    for key, value in ref.items():
        got = getattr(ours, key)
        assert got.dtype == DTYPE and got.shape == value.shape, key
        assert torch.equal(got, value), (key, (got.float() - value.float()).abs().max())


def test_plan_uses_hidden_states_minus_two(model):
    branches = make_branches(4)
    ours = run(model, branches, seed=3)
    target = branches["cond"].visual_output_mask
    embeds = model.input_embeds(branches["cond"], dtype=DTYPE)
    embeds[0, target] = ours.planned_vit[0]
    out = model.mllm(inputs_embeds=embeds, position_ids=branches["cond"].position_ids[:, None],
                     attention_mask=branches["cond"].attention_mask_4d[None, None].to(DTYPE),
                     output_hidden_states=True, use_cache=False)
    assert torch.equal(ours.wtxt_wvit, model.connector.for_gen(out.hidden_states[-2]))
    assert not torch.allclose(ours.wtxt_wvit, model.connector.for_gen(out.hidden_states[-1]))
    assert not torch.allclose(ours.wtxt_wvit, model.connector.for_gen(out.hidden_states[-3]))


def test_contexts_shapes_and_positions(model):
    branches = make_branches(8)
    ctx = run(model, branches, seed=5)
    assert isinstance(ctx, PlannerContexts)
    cond_len, uncond_len = branches["cond"].length, branches["uncond"].length
    assert ctx.wtxt_wvit.shape == (1, cond_len, GEN_DIM)
    assert ctx.wtxt_wovit.shape == (1, cond_len - 8, GEN_DIM)
    assert ctx.wotxt_wvit.shape == (1, 8, GEN_DIM)
    assert ctx.wotxt_wovit.shape == (1, uncond_len - 8, GEN_DIM)
    target = branches["cond"].visual_output_mask
    assert torch.equal(ctx.wtxt_wovit, ctx.wtxt_wvit[:, ~target])  # text + sources + the closing token, in order
    assert torch.equal(ctx.wotxt_wvit, ctx.wtxt_wvit[:, target])
    # the uncond context keeps the uncond branch's rows, not the cond ones
    assert not torch.equal(ctx.wotxt_wovit, ctx.wtxt_wovit[:, :uncond_len - 8])


def test_plan_is_reproducible_and_seed_dependent(model):
    branches = make_branches(6)
    a, b, c = run(model, branches, seed=1), run(model, branches, seed=1), run(model, branches, seed=2)
    for key in ("wtxt_wvit", "wotxt_wovit", "planned_vit"):
        assert torch.equal(getattr(a, key), getattr(b, key))
        assert not torch.equal(getattr(a, key), getattr(c, key))


def test_rng_consumption(model, monkeypatch):
    n, steps = 8, 4
    branches = make_branches(n)
    noises = []
    original = model.vit_decoder.sample

    def spy(*args, **kwargs):
        noises.append(kwargs["noise"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(model.vit_decoder, "sample", spy)
    rng = PlannerRng.from_seed(21)
    run(model, branches, seed=21, rng=rng, planning_step=steps)
    numpy_after, torch_after = rng.numpy.random(), torch.randn(3, generator=rng.torch)

    np.random.seed(21)
    torch.manual_seed(21)
    order = np.arange(n)
    np.random.shuffle(order)  # one shuffle (docs/official_behaviour.md §7.1 item 2)
    expected = [torch.randn(len(p), VIT_DIM) for p in mask_schedule(n, steps, order) if p]  # item 3
    assert np.random.random() == numpy_after
    assert torch.equal(torch.randn(3), torch_after)
    assert len(noises) == len(expected) == 4
    for got, want in zip(noises, expected):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_skipped_steps_draw_nothing_and_keep_mask_token(model, monkeypatch):
    # N=3, S=3 with order[:2] = [2, 0]: step 1 would predict {0} alone -> skipped, token 0 stays masked
    seed = numpy_seed_giving([2, 0], 3)
    branches = make_branches(3)
    calls = []
    original = model.hidden
    monkeypatch.setattr(model, "hidden", lambda e, b, **kw: calls.append(b.name) or original(e, b, **kw))
    steps = []
    rng = PlannerRng.from_seed(seed)
    ctx = run(model, branches, seed=seed, rng=rng, planning_step=3, on_step=lambda s, total: steps.append((s, total)))
    torch_after = torch.randn(2, generator=rng.torch)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert calls == ["cond", "uncond", "imgcond"] * 2 + ["cond", "uncond"]  # skipped step: no forwards
    mask_token = model.mask_tokens[0, 0].to(DTYPE)
    assert torch.equal(ctx.planned_vit[0, 0], mask_token)
    assert not torch.equal(ctx.planned_vit[0, 1], mask_token) and not torch.equal(ctx.planned_vit[0, 2], mask_token)
    torch.manual_seed(seed)
    torch.randn(1, VIT_DIM)
    torch.randn(1, VIT_DIM)  # two decoded steps of one token each; the skipped one draws nothing
    assert torch.equal(torch.randn(2), torch_after)


def test_revealed_tokens_written_into_all_branches(model, monkeypatch):
    n, steps = 8, 4
    branches = make_branches(n)
    seen, outputs = [], []
    hidden, sample = model.hidden, model.vit_decoder.sample
    monkeypatch.setattr(model, "hidden",
                        lambda e, b, **kw: seen.append((b.name, e[0, b.visual_output_mask].clone())) or hidden(e, b, **kw))
    monkeypatch.setattr(model.vit_decoder, "sample", lambda *a, **kw: outputs.append(sample(*a, **kw)) or outputs[-1])
    ctx = run(model, branches, seed=8, planning_step=steps)
    np.random.seed(8)
    order = np.arange(n)
    np.random.shuffle(order)
    schedule = mask_schedule(n, steps, order)
    mask_token = model.mask_tokens[0, 0].to(DTYPE)
    expected = mask_token.expand(n, -1).clone()
    decoded = [indices for indices in schedule if indices]
    assert len(outputs) == len(decoded) and len(seen) == 3 * len(decoded) + 2
    for k, indices in enumerate(decoded):
        for name, targets in seen[3 * k:3 * k + 3]:  # what each branch saw before this decode
            assert torch.equal(targets, expected), (k, name)
        expected[indices] = outputs[k].to(DTYPE)  # ascending token index
    final = dict(seen[-2:])
    assert torch.equal(final["cond"], expected) and torch.equal(final["uncond"], expected)
    assert torch.equal(ctx.planned_vit[0], expected)


def test_plan_validates_inputs(model):
    branches = make_branches(4)
    with pytest.raises(BerniniError, match="missing"):
        run(model, {k: v for k, v in branches.items() if k != "imgcond"}, seed=0)
    bad = dict(branches, uncond=make_branch("uncond", n_text=5, n_inputs=0, n_targets=3, seed=3))
    with pytest.raises(BerniniError, match="target tokens"):
        run(model, bad, seed=0)
    with pytest.raises(BerniniError, match="dtype|float32"):
        run(model, branches, seed=0, dtype=torch.float32)
    with pytest.raises(BerniniError, match="planning_step"):
        run(model, branches, seed=0, planning_step=0)
