"""--fsdp (bernini_core/parallel/fsdp.py): a DiT expert's weights sharded with FSDP2 over its Ulysses group.

One gloo world of 2 CPU processes (U=2), spawned once for the module: the tiny DiT of test_parallel_ulysses.py
sharded over the Ulysses group, run with Ulysses, compared with the single-process forward of an unsharded copy
(fp32) and bit for bit with the Ulysses forward of an unsharded copy (fp32 and bf16 with fp32 islands).
The mesh is the Ulysses group, never the replica: arm groups (--cfg_parallel) run different numbers of forwards
per step, which a replica-wide all-gather cannot survive; the test checks the mesh's ranks.
"""

from __future__ import annotations

import pytest
import torch

from bernini_core.errors import BerniniError
from bernini_core.parallel import ParallelConfig, ParallelState
from bernini_core.parallel.fsdp import check_fsdp, planned_parameter_bytes, shard_expert
from parallel_tools import run_world
from test_parallel_ulysses import case_inputs, rel_err, tiny_dit

TOLERANCE = 1e-6  # fp32, max |sharded - plain| / max |plain|
FORWARDS = [("mixed", 5), ("no_padding", 6)]  # (case, seed): padded and unpadded token shards


# ----------------------------------------------------------------------------- what every rank runs
def _dit(dtype=torch.float32):
    from bernini_core.renderer import cast_dit_

    return cast_dit_(tiny_dit(), dtype, keep_fp32_islands=True).requires_grad_(False)


def _inputs(case, seed, dtype):
    inputs = case_inputs(case, seed)
    inputs["streams"] = [s.to(dtype) for s in inputs["streams"]]
    return inputs


def world_main(rank: int, world: int) -> dict:
    with torch.no_grad():
        return _checks()


def _checks() -> dict:
    from torch.distributed.tensor import DTensor

    from bernini_core.parallel.fsdp import is_sharded, parameter_bytes
    from bernini_core.renderer.transformer import is_fp32_param
    from bernini_core.runtime import module_bytes

    state = ParallelState.build(ParallelConfig(ulysses=2))
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        plain = _dit(dtype)  # one process, no sharding
        ulysses = _dit(dtype)  # Ulysses only: what --fsdp must not change
        ulysses.use_sequence_parallel(state.sequence_parallel())
        sharded = _dit(dtype)
        sharded.use_sequence_parallel(state.sequence_parallel())
        before = parameter_bytes(sharded)
        dtypes_before = {n: str(p.dtype) for n, p in sharded.named_parameters()}
        shard_expert(sharded, state, "cpu")
        after, after_module_bytes = parameter_bytes(sharded), module_bytes(sharded)
        r = {"before": before, "after": after, "module_bytes": after_module_bytes,
             "planned": planned_parameter_bytes(_dit(dtype), 2), "sharded": is_sharded(sharded),
             "dtypes_kept": {n: str(p.dtype) for n, p in sharded.named_parameters()} == dtypes_before,
             "islands_fp32": all((p.dtype == torch.float32) == (is_fp32_param(n) or dtype == torch.float32)
                                 for n, p in sharded.named_parameters()),
             "rel": [], "equal_plain": [], "equal_ulysses": []}
        first = _inputs(*FORWARDS[0], dtype)
        # the context embedded before any forward (denoise does this once per expert), outside forward
        embedded = sharded.embed_context(first["context"], first["context_lens"])
        r["embed_equal"] = bool(torch.equal(embedded.hidden, plain.embed_context(first["context"],
                                                                                  first["context_lens"]).hidden))
        for case, seed in FORWARDS:
            inputs = _inputs(case, seed, dtype)
            expected, reference = plain(**inputs), ulysses(**inputs)
            got = sharded(**inputs)
            r["rel"].append(rel_err(got, expected))
            r["equal_plain"].append(bool(torch.equal(got, expected)))
            r["equal_ulysses"].append(bool(torch.equal(got, reference)))
        r["embedded_forward_equal"] = bool(torch.equal(sharded(**{**first, "context": embedded}), plain(**first)))
        r["mesh_ranks"] = sharded.blocks[0].ffn.net[2].weight.device_mesh.mesh.tolist()
        r["ulysses_ranks"] = list(state.ulysses_ranks)
        r["resharded_after_forward"] = all(isinstance(p, DTensor) for p in sharded.parameters())
        if name == "fp32":
            # --fsdp with --compile: blocks compiled after sharding (aot_eager traces without a compiler)
            from bernini_core.acceleration.compile import compile_blocks

            compiled = _dit(dtype)
            compiled.use_sequence_parallel(state.sequence_parallel())
            shard_expert(compiled, state, "cpu")
            compile_blocks(compiled, backend="aot_eager")
            got = compiled(**first)
            r["compiled_rel"], r["compiled_rel_plain"] = rel_err(got, ulysses(**first)), rel_err(got, plain(**first))
            # what an offload / reload does (.to(device) replaces every shard): still the same forward
            sharded.to(torch.float64)
            sharded.to(torch.float32)
            sharded.to("cpu")
            r["after_move_equal"] = bool(torch.equal(sharded(**first), plain(**first)))
            # can fail: a change to one rank's shard must reach the other rank of its group (gathered weights)
            weight = sharded.blocks[1].ffn.net[2].weight
            if state.ulysses_rank == 1:
                weight.to_local().add_(1.0)
            r["peer_shard_used"] = not torch.equal(sharded(**first), plain(**first))
        out[name] = r
    return out


# ----------------------------------------------------------------------------- the world (spawned once)
@pytest.fixture(scope="module")
def world():
    return run_world(world_main, 2, timeout=120)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sharded_forwards_equal_the_unsharded_ones(world, dtype):
    for rank, result in enumerate(world):
        r = result[dtype]
        assert len(r["rel"]) == len(FORWARDS)
        assert all(r["equal_ulysses"]), (
            f"rank {rank} ({dtype}): the sharded expert must compute exactly what the unsharded one does under "
            f"the same Ulysses group; bit-equal per forward: {r['equal_ulysses']}")
        if dtype == "fp32":
            assert max(r["rel"]) <= TOLERANCE, f"rank {rank}: sharded vs single process differs by {r['rel']}"
        assert r["embed_equal"] and r["embedded_forward_equal"], f"rank {rank} ({dtype}): embed_context differs"
        assert r["dtypes_kept"] and r["islands_fp32"], f"rank {rank} ({dtype}): sharding changed parameter dtypes"
        assert r["resharded_after_forward"], f"rank {rank} ({dtype}): whole parameters were left after a forward"


def test_compiled_sharded_blocks_equal_the_unsharded_forward(world):
    for rank, result in enumerate(world):
        r = result["fp32"]
        assert r["compiled_rel"] <= TOLERANCE and r["compiled_rel_plain"] <= TOLERANCE, (
            f"rank {rank}: FSDP-sharded compiled blocks differ by {r['compiled_rel']:.3g} (Ulysses) / "
            f"{r['compiled_rel_plain']:.3g} (one process)")


def test_the_mesh_is_the_ulysses_group(world):
    for rank, result in enumerate(world):
        assert result["fp32"]["mesh_ranks"] == result["fp32"]["ulysses_ranks"] == [0, 1], f"rank {rank}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_each_rank_holds_about_half_the_parameter_bytes(world, dtype):
    for rank, result in enumerate(world):
        r = result[dtype]
        assert r["sharded"]
        assert r["after"] == r["planned"], f"rank {rank}: {r['after']} bytes held, {r['planned']} planned"
        assert 0.5 * r["before"] <= r["after"] <= 0.51 * r["before"], (
            f"rank {rank} ({dtype}): {r['after']} of {r['before']} parameter bytes after sharding over 2 ranks")
        assert r["module_bytes"] <= 0.51 * r["before"], "runtime.module_bytes must count only this rank's shards"
    assert len({result[dtype]["after"] for result in world}) == 1  # FSDP2 pads shards: the same on every rank


def test_moving_the_sharded_expert_keeps_it_exact(world):
    for rank, result in enumerate(world):
        assert result["fp32"]["after_move_equal"], f"rank {rank}: .to() (offload/reload) broke the sharded expert"


def test_forwards_use_the_other_ranks_shards(world):
    for rank, result in enumerate(world):
        assert result["fp32"]["peer_shard_used"], (
            f"rank {rank}: changing the peer's shard did not change this rank's output: weights are not gathered")


# ----------------------------------------------------------------------------- single process
def test_unsupported_layouts_are_refused_before_loading():
    for config in (ParallelConfig(), ParallelConfig(cfg=2), ParallelConfig(cfg=2, dp=2)):
        with pytest.raises(BerniniError, match=r"--fsdp .*ulysses=1.*--ulysses 2 or more"):
            check_fsdp(config)
    check_fsdp(ParallelConfig(ulysses=2, cfg=2, dp=2))
    with pytest.raises(BerniniError, match="ulysses=1"):
        shard_expert(tiny_dit(), ParallelState.single())
    with pytest.raises(BerniniError, match="needs a BerniniDiT"):
        shard_expert(torch.nn.Linear(2, 2), ParallelState.single())


def test_planned_bytes_for_the_14b_expert():
    from bernini_core.renderer import BerniniDiT, cast_dit_
    from bernini_core.renderer.config import WAN22_A14B

    with torch.device("meta"):
        dit = cast_dit_(BerniniDiT(WAN22_A14B), torch.bfloat16, keep_fp32_islands=True)
    full = planned_parameter_bytes(dit, 1)
    assert 26 * 2**30 < full < 27.5 * 2**30  # ~14.3 B parameters, bf16 with fp32 islands
    for ways in (2, 4, 8):
        assert full / ways <= planned_parameter_bytes(dit, ways) <= 1.005 * full / ways
