"""Ulysses sequence parallelism (bernini_core/parallel/): config checks, rank layout, sequence shards, the
all-to-all, and a tiny fp32 DiT whose sharded forward must equal the single-process forward.

Multi-process checks run in one gloo world of 2 and one of 4 CPU processes (tests/parallel_tools.py), each
spawned once per module and reused by several tests; the numbers are measured inside the ranks and asserted here.
The DiT: 4 heads x head_dim 20, 2 layers, batch 2 (different timesteps, context lengths 600 / 530 so cross-attention
has a key mask), streams of 6 (video), 3 (image of another aspect ratio) and 12 (target) tokens = 21 tokens: padded
to 22 for U=2 and 24 for U=4.
"""

from __future__ import annotations

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.parallel import ParallelConfig, ParallelState, UlyssesAttention, rank_layout, shard_sequence
from bernini_core.parallel.state import all_groups
from bernini_core.renderer import BerniniDiT, DiTConfig
from bernini_core.renderer.rope import RopeTableCache
from parallel_tools import run_world

CFG = DiTConfig(num_attention_heads=4, attention_head_dim=20, text_dim=32, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32)
TOLERANCE = 1e-5  # max |parallel - plain| / max |plain|

# (name, stream latents [T, H, W] sources first, target last, source ids): "mixed" pads for U=2 and U=4
CASES = {
    "mixed": ([(1, 6, 4), (1, 2, 6), (2, 4, 6)], [1.0, 2.0, 0.0]),  # 6 + 3 + 12 = 21 tokens
    "no_padding": ([(1, 4, 4)], [0.0]),  # 4 tokens: a multiple of 2 and 4
    "one_token": ([(1, 2, 2)], [0.0]),  # 1 token: all but one rank hold only padding
}


# ----------------------------------------------------------------------------- shared by ranks and tests
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def tiny_dit(seed: int = 0) -> BerniniDiT:
    """The same random fp32 DiT in every process: default init, then every parameter perturbed."""
    torch.manual_seed(seed)
    model = BerniniDiT(CFG).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    model.set_attention_backend("sdpa")
    return model


def case_inputs(case: str, seed: int):
    shapes, sids = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    batch = 2
    streams = [torch.randn(batch, 16, *shape, generator=gen) for shape in shapes]
    context = torch.randn(batch, 600, CFG.text_dim, generator=gen)
    return dict(streams=streams, source_ids=sids, timestep=torch.tensor([3.0, 700.0]), context=context,
                context_lens=[600, 530])


def tokens_of(case: str) -> int:
    return sum(t * (h // 2) * (w // 2) for t, h, w in CASES[case][0])


# ----------------------------------------------------------------------------- what every rank runs
@torch.no_grad()
def _compare_dit(plain: BerniniDiT, handler, case: str, seed: int) -> dict:
    inputs = case_inputs(case, seed)
    reference = plain(**inputs)
    parallel = tiny_dit()  # a second instance with the same weights
    parallel.use_sequence_parallel(handler)
    sharded = parallel(**inputs)
    again = plain(**inputs)  # the plain instance must not have changed
    return {"rel": rel_err(sharded, reference), "equal": bool(torch.equal(sharded, reference)),
            "plain_untouched": bool(torch.equal(again, reference)) and plain.sequence_parallel is None,
            "checksum": float(sharded.double().sum())}


@torch.no_grad()
def _compare_compiled(plain: BerniniDiT, handler, case: str, seed: int) -> dict:
    """A Ulysses-sharded DiT whose blocks are compiled (acceleration/compile.py; aot_eager traces without a compiler):
    the all-to-all inside the blocks' attention must still give the plain forward."""
    from bernini_core.acceleration.compile import compile_blocks

    inputs = case_inputs(case, seed)
    reference = plain(**inputs)
    parallel = tiny_dit()
    parallel.use_sequence_parallel(handler)
    compile_blocks(parallel, backend="aot_eager")
    sharded = parallel(**inputs)
    return {"rel": rel_err(sharded, reference), "compiled": parallel.compiled_blocks is not None}


def _all_to_all_checks(state: ParallelState) -> dict:
    """seq_to_heads moves the right rows; heads_to_seq inverts it; gather_sequence undoes shard_sequence."""
    from bernini_core.parallel import gather_sequence, heads_to_seq, seq_to_heads

    size, rank, group = state.ulysses_size, state.ulysses_rank, state.ulysses_group
    batch, tokens, heads, head_dim = 2, 3, 4, 5
    pieces = [torch.randn(batch, tokens, heads, head_dim, generator=torch.Generator().manual_seed(10 + r))
              for r in range(size)]
    mine = pieces[rank]
    gathered = seq_to_heads(mine, group)
    per = heads // size
    expected = torch.cat(pieces, dim=1)[:, :, rank * per:(rank + 1) * per]
    back = heads_to_seq(gathered, group)
    whole = torch.randn(batch, 7, 6, generator=torch.Generator().manual_seed(99))  # 7 tokens: padding for 2 and 4
    shard, length = shard_sequence(whole, size, rank)
    regathered = gather_sequence(shard, group, length)
    return {"forward_ok": bool(torch.equal(gathered, expected)), "round_trip": bool(torch.equal(back, mine)),
            "gather_ok": bool(torch.equal(regathered, whole)), "layout": list(gathered.shape)}


def _group_members(state: ParallelState) -> dict:
    """Each group, asked by an all_gather of the global ranks, must hold exactly the layout's ranks."""
    import torch.distributed as dist

    found = {}
    for kind in ("ulysses", "cfg", "dp", "replica"):
        group = getattr(state, kind + "_group")
        size = dist.get_world_size(group)
        ranks = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
        dist.all_gather(ranks, torch.tensor([state.rank]), group=group)
        found[kind] = [int(r) for r in ranks] == list(getattr(state, kind + "_ranks"))
    return found


def world_main(rank: int, world: int) -> dict:
    """Everything a world checks; rank results are returned to the parent as JSON."""
    out = {}
    state = ParallelState.build(ParallelConfig(ulysses=world))
    out["state"] = {"rank": state.rank, "ulysses_rank": state.ulysses_rank, "leader": state.replica_leader}
    out["all_to_all"] = _all_to_all_checks(state)
    plain = tiny_dit()
    handler = state.sequence_parallel()
    for case in CASES:
        out[f"dit_{case}"] = _compare_dit(plain, handler, case, seed=5)
    # the official behaviour (padding rows attended as keys) must be told apart from ours
    out["attend_padding_mixed"] = _compare_dit(plain, state.sequence_parallel(attend_padding=True), "mixed", 5)
    out["attend_padding_no_padding"] = _compare_dit(plain, state.sequence_parallel(attend_padding=True),
                                                    "no_padding", 5)
    if world == 2:
        out["compiled_mixed"] = _compare_compiled(plain, handler, "mixed", 5)
    if world == 4:
        layouts = {"u2c2": ParallelConfig(ulysses=2, cfg=2), "u2d2": ParallelConfig(ulysses=2, dp=2),
                   "u1c2d2": ParallelConfig(cfg=2, dp=2), "u4": ParallelConfig(ulysses=4)}
        out["groups"] = {}
        for name, config in layouts.items():  # every rank builds the same states in the same order
            sub = ParallelState.build(config)
            out["groups"][name] = _group_members(sub)
            if name == "u2c2":  # two Ulysses groups, each on its own inputs
                out["two_groups"] = _compare_dit(plain, sub.sequence_parallel(), "mixed", seed=100 + sub.cfg_rank)
                out["two_groups"]["cfg_rank"] = sub.cfg_rank
    return out


# ----------------------------------------------------------------------------- worlds (spawned once each)
@pytest.fixture(scope="module")
def world2():
    return run_world(world_main, 2, timeout=120)


@pytest.fixture(scope="module")
def world4():
    return run_world(world_main, 4, timeout=150)


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def world(request):
    return request.param, request.getfixturevalue(f"world{request.param}")


def test_all_to_all_moves_the_right_rows_and_round_trips(world):
    size, results = world
    for rank, result in enumerate(results):
        checks = result["all_to_all"]
        assert result["state"]["rank"] == rank and result["state"]["ulysses_rank"] == rank
        assert checks["layout"] == [2, 3 * size, 4 // size, 5], f"rank {rank}: seq_to_heads gave {checks['layout']}"
        assert checks["forward_ok"], f"rank {rank}: seq_to_heads did not return all tokens of its heads"
        assert checks["round_trip"], f"rank {rank}: heads_to_seq(seq_to_heads(x)) != x"
        assert checks["gather_ok"], f"rank {rank}: gather_sequence(shard_sequence(x)) != x"


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_dit_equals_the_single_process_forward(world, case):
    size, results = world
    for rank, result in enumerate(results):
        measured = result[f"dit_{case}"]
        assert measured["rel"] <= TOLERANCE, (
            f"U={size} rank {rank}, {case} ({tokens_of(case)} tokens): sharded forward differs from the plain one "
            f"by {measured['rel']:.3g} (relative to max |output|)")
        assert measured["plain_untouched"], f"U={size} rank {rank}: the plain DiT changed"
    assert len({r[f"dit_{case}"]["checksum"] for r in results}) == 1, "ranks of one group got different outputs"


def test_compiled_sharded_dit_equals_the_single_process_forward(world2):
    for rank, result in enumerate(world2):
        measured = result["compiled_mixed"]
        assert measured["compiled"] and measured["rel"] <= TOLERANCE, (
            f"rank {rank}: compiled blocks under Ulysses differ from the plain forward by {measured['rel']:.3g}")


def test_attending_padding_keys_would_break_the_equality(world):
    """Proves the comparison can fail: the official rule (padding rows attended) is off whenever padding occurs."""
    size, results = world
    for rank, result in enumerate(results):
        assert result["attend_padding_mixed"]["rel"] > 1e-3, (
            f"U={size} rank {rank}: attending the padding rows should change the output, but the difference is "
            f"{result['attend_padding_mixed']['rel']:.3g}")
        assert result["attend_padding_no_padding"]["rel"] <= TOLERANCE  # no padding: nothing to tell apart


def test_two_ulysses_groups_work_on_their_own_inputs(world4):
    outputs = {}
    for rank, result in enumerate(world4):
        measured = result["two_groups"]
        assert measured["rel"] <= TOLERANCE, f"U=2 x C=2, rank {rank}: differs by {measured['rel']:.3g}"
        outputs.setdefault(measured["cfg_rank"], set()).add(measured["checksum"])
    assert sorted(outputs) == [0, 1] and all(len(v) == 1 for v in outputs.values())
    assert outputs[0] != outputs[1], "the two groups were given different inputs and must give different outputs"


def test_process_groups_hold_the_layout_ranks(world4):
    for rank, result in enumerate(world4):
        for layout, kinds in result["groups"].items():
            assert all(kinds.values()), f"rank {rank}, layout {layout}: wrong members in {kinds}"


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("tokens,size", [(21, 2), (21, 4), (24, 4), (1, 4), (5, 8)])
def test_rope_and_token_shards_are_the_unsharded_rows(tokens, size):
    cache = RopeTableCache(CFG.attention_head_dim, 64)
    grids = [(1, 1, tokens)]
    table = cache.get(grids, [0.0], "cpu")
    x = torch.randn(2, tokens, 8)
    chunk = -(-tokens // size)
    for rank in range(size):
        rows, length = shard_sequence(table, size, rank, dim=0)
        part, _ = shard_sequence(x, size, rank, dim=1)
        assert length == tokens and rows.shape == (chunk, table.shape[1]) and part.shape == (2, chunk, 8)
        real = max(0, min(chunk, tokens - rank * chunk))
        assert torch.equal(rows[:real], table[rank * chunk: rank * chunk + real])
        assert torch.equal(part[:, :real], x[:, rank * chunk: rank * chunk + real])
        assert not rows[real:].any() and not part[:, real:].any()  # padding is zeros
        assert rows.is_contiguous() and part.is_contiguous()
    with pytest.raises(BerniniError, match="rank"):
        shard_sequence(x, size, size)


def test_parallel_config_checks():
    assert ParallelConfig().world_size == 1 and ParallelConfig(ulysses=8, cfg=2, dp=3).world_size == 48
    with pytest.raises(BerniniError, match=r"ulysses=3 does not divide the DiT's 40 .*1, 2, 4, 5, 8, 10, 20, 40"):
        ParallelConfig(ulysses=3).check(heads=40)
    with pytest.raises(BerniniError, match=r"1, 2, 3, 4, 6, 12"):
        ParallelConfig(ulysses=8).check(heads=12)  # Wan2.1-1.3B
    assert ParallelConfig(ulysses=8).check(heads=40).ulysses == 8
    with pytest.raises(BerniniError, match=r"6 processes .*dp=2 x cfg=2 x ulysses=2 needs 8"):
        ParallelConfig(ulysses=2, cfg=2, dp=2).check(world_size=6)
    ParallelConfig(ulysses=2, cfg=2, dp=2).check(heads=40, world_size=8)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(BerniniError, match="whole number >= 1"):
            ParallelConfig(ulysses=bad)
    with pytest.raises(BerniniError, match="dp"):
        ParallelConfig(dp=0)


def test_rank_layout_and_group_order():
    config = ParallelConfig(ulysses=2, cfg=2, dp=2)
    layout = rank_layout(config, 6)  # replica 1, arm group 1, ulysses rank 0
    assert layout.ulysses_ranks == (6, 7) and layout.cfg_ranks == (4, 6) and layout.dp_ranks == (2, 6)
    assert layout.replica_ranks == (4, 5, 6, 7)
    groups = list(all_groups(config))
    assert [r for k, r in groups if k == "ulysses"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [r for k, r in groups if k == "cfg"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert [r for k, r in groups if k == "dp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    for rank in range(config.world_size):  # every rank is in exactly one group of each kind
        for kind in ("ulysses", "cfg", "dp", "replica"):
            assert sum(rank in r for k, r in groups if k == kind) == 1
    with pytest.raises(BerniniError, match="outside"):
        rank_layout(config, 8)


def test_single_state_and_build_without_a_world():
    import torch.distributed as dist

    state = ParallelState.single()
    assert (state.rank, state.world, state.ulysses_size, state.cfg_size, state.dp_size) == (0, 1, 1, 1, 1)
    assert state.is_replica_leader and state.replica_leader == 0 and state.sequence_parallel() is None
    assert state.ulysses_group is None and not state.is_parallel
    if not dist.is_initialized():
        with pytest.raises(BerniniError, match="init_process_group"):
            ParallelState.build(ParallelConfig(ulysses=2))


def test_use_sequence_parallel_checks_the_head_count():
    handler = UlyssesAttention(None)
    handler.size = 3  # as if in a group of 3: 3 does not divide CFG's 4 heads
    with pytest.raises(BerniniError, match=r"ulysses=3 .*1, 2, 4"):
        BerniniDiT(CFG).use_sequence_parallel(handler)
