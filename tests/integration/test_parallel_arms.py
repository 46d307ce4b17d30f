"""Guidance arms spread over arm groups (ParallelConfig(cfg=C)) and the pickle-free broadcasts they rely on.

* ``assign_arms``: balanced, deterministic, every arm once, idle groups when C exceeds the arms (no world);
* one gloo world of 2 (C=2) and one of 4 (U=2 x C=2), each spawned once per module (tests/parallel_tools.py):
  ``broadcast_tensors`` / ``broadcast_json`` / ``broadcast_object`` round trips and ``check_identical``, and the
  sampling loop ``denoise`` with two tiny random fp32 experts (a real high -> low switch and omega_scale) against the
  single-process ``denoise`` run inside the same rank, for Bernini-R rv2v (4 arms) and r2v_apg (3 arms, momentum
  state) and full-Bernini rv2v_wapg (5 arms). The streams: a target of 12 tokens, a source video of 12 and two
  reference images of other aspect ratios (3 and 2 tokens): the arms' lengths are 12, 14/17, 24 and 29 tokens (29
  pads to 30 for U=2). Each rank also records the token count of every DiT call it made, so the tests see that a
  group ran exactly its share.
"""

from __future__ import annotations

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.parallel import ParallelConfig, ParallelState, assign_arms
from bernini_core.parallel.arms import arms_of_group, group_loads
from bernini_core.renderer import BerniniDiT, DiTConfig
from parallel_tools import run_world

CFG = DiTConfig(num_attention_heads=4, attention_head_dim=8, text_dim=32, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32)
TOLERANCE = 1e-5  # max |parallel - plain| / max |plain| on the final latents (fp32)
GEOMETRY = dict(num_frames=5, height=32, width=48)  # latent [1, 16, 2, 4, 6]: 12 target tokens
STEPS = 5
TARGET_TOKENS = 12
VIDEO, IMAGE_A, IMAGE_B = (2, 4, 6), (1, 6, 2), (1, 2, 4)  # latent T, H, W: 12, 3 and 2 tokens


# ----------------------------------------------------------------------------- shared by ranks and tests
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def tiny_dit(seed: int) -> BerniniDiT:
    """The same random fp32 DiT in every process: default init, then every parameter perturbed."""
    torch.manual_seed(seed)
    model = BerniniDiT(CFG).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    model.set_attention_backend("sdpa")
    return model


def experts_for(handler=None, calls=None):
    """High (seed 0) and low (seed 10) experts; ``calls`` collects the token count of every forward."""
    from bernini_core.denoise import Experts
    from bernini_core.runtime import Runtime

    runtime = Runtime("cpu")
    handles = []
    for name, seed in (("high", 0), ("low", 10)):
        dit = tiny_dit(seed)
        if handler is not None:
            dit.use_sequence_parallel(handler)
        if calls is not None:
            original = dit.forward

            def spy(streams, *args, _name=name, _orig=original, **kwargs):
                calls.append([_name, sum(s[0, 0].numel() // 4 for s in streams)])
                return _orig(streams, *args, **kwargs)

            dit.forward = spy
        handles.append(runtime.handle(name, dit))
    return Experts(high=handles[0], low=handles[1], boundary=0.875), runtime


def sampling_case(name: str):
    """(guidance, combos, contexts, omegas) of one case, the same in every process."""
    from bernini_core.denoise import renderer_combos
    from bernini_core.sampling.guidance import APGConfig, Omegas, RendererGuidance
    from bernini_core.sampling.guidance_full import FULL_CONTEXTS, FullGuidance
    from bernini_core.stages import Sources

    gen = torch.Generator().manual_seed(7)
    video = torch.randn(1, 16, *VIDEO, generator=gen)
    images = [torch.randn(1, 16, *IMAGE_A, generator=gen), torch.randn(1, 16, *IMAGE_B, generator=gen)]
    sources = Sources("rv2v", videos=[video], images=images)
    if name in ("rv2v", "r2v_apg"):
        guidance = RendererGuidance(name, APGConfig(eta=0.5, momentum=0.5, norm_threshold=(2.0, 3.0)))
        combos = renderer_combos(sources, use_source_ids=True, max_trained=5, interpolate=True)
        contexts = {key: torch.randn(1, 512, CFG.text_dim, generator=gen) for key in ("pos", "neg")}
        return guidance, combos, contexts, Omegas(vid=1.5, img=2.0, txt=3.0)
    assert name == "rv2v_wapg"
    combos = {"wovae": ([], []), "wimgvae": (images, [1.0, 2.0]), "wvidvae": ([video], [1.0]),
              "wvae": (images + [video], [1.0, 2.0, 3.0])}
    contexts = {key: torch.randn(1, 520, CFG.text_dim, generator=gen) for key in FULL_CONTEXTS}
    return FullGuidance(name), combos, contexts, Omegas(vid=1.5, img=2.0, txt=3.0, tgt=0.5)


CASES = ("rv2v", "r2v_apg", "rv2v_wapg")


def run_denoise(case: str, experts, runtime, parallel=None) -> torch.Tensor:
    from bernini_core.denoise import denoise

    guidance, combos, contexts, omegas = sampling_case(case)
    with torch.inference_mode():  # as the pipelines call it
        return denoise(experts, guidance, combos, contexts, omegas, **GEOMETRY, num_inference_steps=STEPS,
                       flow_shift=5.0, omega_scale=0.7, seed=3, runtime=runtime, use_unipc=True, parallel=parallel)


def sent_tensors(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "bf16": torch.randn(2, 5, generator=gen).to(torch.bfloat16),
        "i64": torch.randint(-2**40, 2**40, (7,), generator=gen),
        "zero_size": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.rand(4, generator=gen) > 0.5,
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
        "nothing": None,
    }


def same_tensors(got: dict, expected: dict) -> bool:
    if list(got) != list(expected):
        return False
    for name, value in expected.items():
        if value is None:
            if got[name] is not None:
                return False
        elif not (got[name].dtype == value.dtype and got[name].shape == value.shape
                  and torch.equal(got[name], value) and got[name].is_contiguous()):
            return False
    return True


# ----------------------------------------------------------------------------- what every rank runs
def _exchange_checks(state: ParallelState) -> dict:
    from bernini_core.parallel.exchange import broadcast_json, broadcast_object, broadcast_tensors, check_identical
    from bernini_core.stages import Sources

    out = {}
    group, ranks = state.cfg_group, state.cfg_ranks
    for src in ranks:  # every member sends once; src is a global rank
        expected = sent_tensors(100 + src)
        got = broadcast_tensors(expected if state.rank == src else None, src, group, "cpu")
        out[f"tensors_from_{src}"] = same_tensors(got, expected)
        out[f"empty_from_{src}"] = broadcast_tensors({} if state.rank == src else None, src, group) == {}
        meta = {"task": "rv2v", "shape": [1, 16, 2, 4, 6], "ids": [1.0, 2.5], "seed": 2**40 + src, "none": None}
        out[f"json_from_{src}"] = broadcast_json(meta if state.rank == src else None, src, group) == meta
    gen = torch.Generator().manual_seed(5)
    sources = Sources("rv2v", videos=[torch.randn(1, 16, 2, 4, 6, generator=gen)],
                      images=[torch.randn(1, 16, 1, 6, 2, generator=gen).bfloat16()], frame_count=5, height=32)
    combos = {"none": ([], []), "VI": ([sources.videos[0], sources.images[0]], [1.0, 2.0])}
    obj = {"sources": sources, "combos": combos, "dtype": torch.bfloat16, "pair": (1, "a")}
    got = broadcast_object(obj if state.rank == ranks[-1] else None, ranks[-1], group)
    out["object"] = (isinstance(got["sources"], Sources) and got["sources"].task == "rv2v"
                     and got["sources"].frame_count == 5 and got["sources"].width is None
                     and torch.equal(got["sources"].videos[0], sources.videos[0])
                     and got["sources"].images[0].dtype == torch.bfloat16
                     and torch.equal(got["sources"].images[0], sources.images[0])
                     and got["combos"]["none"] == ([], []) and got["combos"]["VI"][1] == [1.0, 2.0]
                     and torch.equal(got["combos"]["VI"][0][0], sources.videos[0])
                     and got["dtype"] is torch.bfloat16 and got["pair"] == (1, "a"))
    # a value the sender cannot send fails on every rank, never hangs the receivers
    try:
        broadcast_json({1, 2} if state.rank == ranks[0] else None, ranks[0], group)
        out["bad_json"] = "no error"
    except BerniniError as error:
        out["bad_json"] = str(error)
    check_identical({"a": 1, "shape": [2, 3]}, state.replica_group, "the settings")
    try:
        check_identical({"height": 32 + 16 * (state.rank % 2)}, state.replica_group, "the settings")
        out["mismatch"] = "no error"
    except BerniniError as error:
        out["mismatch"] = str(error)
    return out


def world_main(rank: int, world: int) -> dict:
    config = ParallelConfig(cfg=2) if world == 2 else ParallelConfig(ulysses=2, cfg=2)
    state = ParallelState.build(config)
    out = {"cfg_rank": state.cfg_rank, "ulysses_rank": state.ulysses_rank, "exchange": _exchange_checks(state)}
    plain_experts, plain_runtime = experts_for()
    calls: list = []
    experts, runtime = experts_for(state.sequence_parallel(), calls)
    for case in CASES:
        reference = run_denoise(case, plain_experts, plain_runtime)
        del calls[:]
        result = run_denoise(case, experts, runtime, parallel=state)
        out[case] = {"rel": rel_err(result, reference), "equal": bool(torch.equal(result, reference)),
                     "calls": list(calls), "checksum": float(result.double().sum()),
                     "finite": bool(torch.isfinite(result).all())}
    # inputs that differ between the ranks are refused up front, on every rank
    from bernini_core.denoise import denoise

    guidance, combos, contexts, omegas = sampling_case("rv2v")
    try:
        denoise(experts, guidance, combos, contexts, omegas, **GEOMETRY, num_inference_steps=STEPS,
                flow_shift=5.0, omega_scale=0.7, seed=3 + state.rank, runtime=runtime, parallel=state)
        out["different_seeds"] = "no error"
    except BerniniError as error:
        out["different_seeds"] = str(error)
    return out


# ----------------------------------------------------------------------------- worlds (spawned once each)
@pytest.fixture(scope="module")
def world2():
    return run_world(world_main, 2, timeout=120)


@pytest.fixture(scope="module")
def world4():
    return run_world(world_main, 4, timeout=150)


@pytest.fixture(params=[2, 4], ids=["C2", "U2xC2"])
def world(request):
    return request.param, request.getfixturevalue(f"world{request.param}")


def test_broadcasts_round_trip(world):
    size, results = world
    for rank, result in enumerate(results):
        checks = result["exchange"]
        failed = [name for name, ok in checks.items() if ok is False]
        assert not failed, f"world {size}, rank {rank}: {failed} did not arrive intact"
        assert "cannot be sent as JSON" in checks["bad_json"] or "could not send" in checks["bad_json"], \
            f"rank {rank}: {checks['bad_json']}"
        assert "disagree about the settings" in checks["mismatch"], f"rank {rank}: {checks['mismatch']}"


@pytest.mark.parametrize("case", CASES)
def test_parallel_arms_equal_the_single_process_run(world, case):
    size, results = world
    for rank, result in enumerate(results):
        measured = result[case]
        assert measured["finite"]
        assert measured["rel"] <= TOLERANCE, (
            f"world {size} rank {rank} ({case}): the final latents differ from the single-process run by "
            f"{measured['rel']:.3g} (relative to max |latent|)")
        if size == 2:  # U=1: each arm is the same forward as the plain run's, so the result is bit for bit the same
            assert measured["equal"], f"rank {rank} ({case}): C=2 alone should equal the plain run exactly"
    assert len({r[case]["checksum"] for r in results}) == 1, f"{case}: the ranks ended with different latents"


# arm token counts per step (target 12 + sources), in the official arm order, and the expected owner groups
ARM_TOKENS = {
    "rv2v": [12, 24, 29, 29],  # none/neg, V/neg, VI/neg, VI/pos
    "r2v_apg": [12, 17, 17],  # none/neg, I/neg, I/pos
    "rv2v_wapg": [29, 12, 24, 29, 29],  # FULL, BASE, VID, SRC, SRC_TXT
}
OWNERS = {"rv2v": [1, 0, 0, 1], "r2v_apg": [0, 0, 1], "rv2v_wapg": [0, 1, 1, 1, 0]}  # loads 53/41, 29/17, 58/65


@pytest.mark.parametrize("case", CASES)
def test_each_group_runs_only_its_arms(world, case):
    size, results = world
    assert assign_arms(ARM_TOKENS[case], 2) == OWNERS[case]
    plain_per_step = ARM_TOKENS[case]
    for rank, result in enumerate(results):
        calls = result[case]["calls"]
        mine = [tokens for tokens, owner in zip(ARM_TOKENS[case], OWNERS[case]) if owner == result["cfg_rank"]]
        assert [tokens for _, tokens in calls] == mine * STEPS, (
            f"world {size} rank {rank} (arm group {result['cfg_rank']}, {case}): ran arms of {calls}, "
            f"expected {mine} per step")
        experts = [name for name, _ in calls]
        switch = experts.index("low")  # the expert switch happens at one step on every rank
        assert 0 < switch < len(experts) and set(experts[switch:]) == {"low"} and switch % len(mine) == 0
    steps_high = {[n for n, _ in r[case]["calls"]].index("low") // sum(o == r["cfg_rank"] for o in OWNERS[case])
                  for r in results}
    assert len(steps_high) == 1, f"{case}: the ranks switched experts at different steps {steps_high}"
    assert sum(len(plain_per_step) for _ in range(STEPS)) == sum(
        len(r[case]["calls"]) for r in results if r["ulysses_rank"] == 0)


def test_inputs_that_differ_between_ranks_are_refused(world):
    size, results = world
    for rank, result in enumerate(results):
        assert "disagree about the sampling inputs" in result["different_seeds"], result["different_seeds"]
        assert "ranks [0" in result["different_seeds"]


# ----------------------------------------------------------------------------- arm assignment (no world)
def test_assign_arms_balances_largest_first():
    assert assign_arms([12, 24, 29, 29], 2) == [1, 0, 0, 1]  # loads 53 / 41
    assert group_loads([12, 24, 29, 29], [1, 0, 0, 1], 2) == [53.0, 41.0]
    costs = [33, 10, 10, 10, 20, 20]  # order 33, 20, 20, 10, 10, 10; each to the lightest group, lowest on a tie
    owners = assign_arms(costs, 3)
    assert owners == [0, 1, 2, 1, 1, 2]
    assert group_loads(costs, owners, 3) == [33.0, 40.0, 30.0]
    assert assign_arms(costs, 2) == [0, 0, 1, 0, 1, 1] and group_loads(costs, [0, 0, 1, 0, 1, 1], 2) == [53.0, 50.0]


def test_assign_arms_is_deterministic_and_assigns_every_arm_once():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 1 + trial % 6
        costs = torch.randint(1, 40, (n,), generator=gen).tolist()
        for groups in (1, 2, 3, 4, 8):
            owners = assign_arms(costs, groups)
            assert owners == assign_arms(list(costs), groups)  # same input, same answer
            assert len(owners) == n and all(0 <= g < groups for g in owners)
            assert sorted(i for g in range(groups) for i in arms_of_group(owners, g)) == list(range(n))
            loads = group_loads(costs, owners, groups)
            # LPT bound: no group carries more than the ideal share plus the largest arm
            assert max(loads) <= sum(costs) / groups + max(costs) + 1e-9
    assert assign_arms([5, 5, 5, 5], 2) == [0, 1, 0, 1]  # equal costs: arm order, lowest group first
    assert assign_arms([7], 1) == [0] and assign_arms([], 3) == []


def test_more_groups_than_arms_leaves_the_last_groups_idle():
    owners = assign_arms([12, 29, 24], 5)
    assert owners == [2, 0, 1]  # one arm per group, largest to group 0; groups 3 and 4 idle
    assert arms_of_group(owners, 3) == [] and arms_of_group(owners, 4) == []
    assert group_loads([12, 29, 24], owners, 5) == [29.0, 24.0, 12.0, 0.0, 0.0]


def test_assign_arms_rejects_bad_input():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BerniniError, match="whole number"):
            assign_arms([1, 2], bad)
    with pytest.raises(BerniniError, match=">= 0"):
        assign_arms([1, -2], 2)
    with pytest.raises(BerniniError, match=">= 0"):
        assign_arms([1, float("nan")], 2)


def test_single_process_broadcasts_return_their_input():
    import torch.distributed as dist

    from bernini_core.parallel import broadcast_json, broadcast_object, broadcast_tensors

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    tensors = sent_tensors(1)
    assert same_tensors(broadcast_tensors(tensors, 0, None), tensors)
    assert broadcast_json({"a": (1, 2)}, 0, None) == {"a": [1, 2]}
    assert broadcast_object({"x": (tensors["f32"], None)}, 0, None)["x"][0] is not None
    with pytest.raises(BerniniError, match="dataclasses"):
        broadcast_object(object(), 0, None)


def test_denoise_without_parallel_is_unchanged():
    """parallel=None and ParallelState.single() take the same path (no process group needed)."""
    experts, runtime = experts_for()
    a = run_denoise("rv2v", experts, runtime)
    b = run_denoise("rv2v", experts, runtime, parallel=ParallelState.single())
    assert torch.equal(a, b) and torch.isfinite(a).all()
