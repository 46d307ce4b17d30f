"""Block swap (bernini_core/acceleration/block_swap.py) on the CPU: the swap schedule runs with plain copies into the
staging views, so outputs, the schedule and where every weight points can be checked without a GPU.

The tiny DiT is TINY_DIT with 4 blocks (so resident, boundary and chained swapped blocks all occur). Expected outputs
come from the same model run without a swap; expected weight locations from the tensors' addresses right after
enable_block_swap (the host copies, where the weights must point whenever their block is not running).
"""

import pytest
import torch

from bernini_core.acceleration.block_swap import disable_block_swap, enable_block_swap, memory_plan
from bernini_core.errors import BerniniError
from bernini_core.renderer import BerniniDiT, DiTConfig
from bernini_core.tiny import TINY_DIT, quantize_fp8_scaled

CONFIG = DiTConfig.from_dict(dict(TINY_DIT, num_layers=4))
LAYERS = CONFIG.num_layers


def make_dit(ops=None, seed=0) -> BerniniDiT:
    """Seeded random weights everywhere (fp8 ops leave Linear weights uninitialised), norms away from identity."""
    gen = torch.Generator().manual_seed(seed)
    dit = BerniniDiT(CONFIG, ops=ops).eval()
    with torch.no_grad():
        for name, param in dit.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim > 1 and "scale_shift_table" not in name:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.2 * noise)
    dit.set_attention_backend("sdpa")
    return dit


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(1, 16, 1, 4, 4, generator=gen)
    target = torch.randn(1, 16, 2, 4, 4, generator=gen)
    return [source, target], [1.0, 0.0], torch.tensor([500.0]), torch.randn(1, 7, 32, generator=gen)


def run(dit):
    streams, ids, timestep, context = inputs()
    with torch.inference_mode():
        return dit(streams, ids, timestep, context)


def tensors_of(module):
    """Every parameter and buffer of `module` by name (buffers matter: fp8 scales)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def addresses(dit):
    return {name: t.data_ptr() for name, t in tensors_of(dit).items()}


def values(dit):
    return {name: t.detach().clone() for name, t in tensors_of(dit).items()}


def swapped_indices(blocks_on_host):
    return range(LAYERS - blocks_on_host, LAYERS)


def placement_checker(dit, blocks_on_host, host_addresses, original):
    """Forward pre-hooks asserting, as block i starts, that its weights are staged copies (other addresses, same
    values) when it is swapped, and that every other swapped block except the prefetched next one is on the host."""
    swapped = set(swapped_indices(blocks_on_host))
    seen = []

    def check(index):
        def hook(_module, _args, _kwargs):
            seen.append(index)
            for j in swapped:
                for name, tensor in tensors_of(dit.blocks[j]).items():
                    key = f"blocks.{j}.{name}"
                    if j == index:
                        assert tensor.data_ptr() != host_addresses[key], f"{key} not staged while its block runs"
                        assert torch.equal(tensor, original[key]), f"{key} staged with other values"
                        assert tensor.data_ptr() % 16 == 0, f"{key} staged misaligned (fp8 matmul needs 16 bytes)"
                    elif j != index + 1:  # the next block may already be staged (prefetched)
                        assert tensor.data_ptr() == host_addresses[key], f"{key} not on the host during block {index}"
        return hook

    handles = [block.register_forward_pre_hook(check(i), with_kwargs=True) for i, block in enumerate(dit.blocks)]
    return seen, handles


@pytest.fixture(scope="module")
def expected():
    """The plain (no swap) output of make_dit(): the reference every swapped forward must equal bit for bit."""
    return run(make_dit())


@pytest.mark.parametrize("blocks_on_host", range(LAYERS + 1))
def test_swap_equals_no_swap_bit_for_bit_and_weights_stay_put(blocks_on_host, expected):
    dit = make_dit()
    original = values(dit)
    swap = enable_block_swap(dit, blocks_on_host, "cpu")
    assert dit.block_swap is swap and swap.swapped == tuple(swapped_indices(blocks_on_host))
    host_addresses = addresses(dit)
    seen, handles = placement_checker(dit, blocks_on_host, host_addresses, original)
    for _ in range(2):  # the second pass takes fresh staging buffers
        assert torch.equal(run(dit), expected)
    assert seen == list(range(LAYERS)) * 2
    for handle in handles:
        handle.remove()
    assert addresses(dit) == host_addresses  # every weight points where it did before the forwards
    after = values(dit)
    assert all(torch.equal(after[name], original[name]) for name in original)
    check_schedule(swap.schedule, blocks_on_host)


def test_schedule_prefetches_the_next_swapped_block_while_the_current_one_runs():
    dit = make_dit()
    swap = enable_block_swap(dit, 2, "cpu")
    run(dit)
    assert swap.schedule == [
        ("run", 0),
        ("prefetch", 2), ("run", 1),
        ("wait", 2), ("prefetch", 3), ("run", 2), ("release", 2),
        ("wait", 3), ("run", 3), ("release", 3),
    ]
    swap = enable_block_swap(dit, LAYERS, "cpu")
    run(dit)
    assert swap.schedule[:5] == [("prefetch", 0), ("wait", 0), ("prefetch", 1), ("run", 0), ("release", 0)]


def check_schedule(events, blocks_on_host):
    """Every swapped block prefetched (while the block before runs), waited for, run, then released before the next
    block runs; resident blocks only run; never more than two blocks staged."""
    swapped = set(swapped_indices(blocks_on_host))
    assert [i for kind, i in events if kind == "run"] == list(range(LAYERS))
    for kind in ("prefetch", "wait", "release"):
        assert sorted(i for k, i in events if k == kind) == sorted(swapped)  # once each, swapped blocks only
    for i in swapped:
        at = {kind: events.index((kind, i)) for kind in ("prefetch", "wait", "run", "release")}
        assert at["prefetch"] < at["wait"] < at["run"] < at["release"]
        if i + 1 < LAYERS:
            assert at["release"] < events.index(("run", i + 1))
        if i - 1 >= 0:  # copied while the block before computes
            assert at["prefetch"] < events.index(("run", i - 1))
    staged, most = set(), 0
    for kind, i in events:
        if kind == "prefetch":
            staged.add(i)
        elif kind == "release":
            staged.discard(i)
        most = max(most, len(staged))
    assert most == min(blocks_on_host, 2)  # the two staging buffers bound device memory


def quantize_block_linears_(dit):
    for block in dit.blocks:
        for layer in block.modules():
            if hasattr(layer, "scale_weight"):
                weight, scale = quantize_fp8_scaled(layer.weight.detach())
                layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                layer.scale_weight.copy_(scale)


@pytest.mark.parametrize("blocks_on_host", [1, LAYERS])
def test_fp8_scaled_weights_and_their_scales_are_swapped(blocks_on_host):
    from bernini_core.quant import fp8_ops

    dit = make_dit(ops=fp8_ops())
    quantize_block_linears_(dit)
    assert dit.blocks[-1].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    expected = run(dit)
    original = values(dit)
    enable_block_swap(dit, blocks_on_host, "cpu")
    host_addresses = addresses(dit)
    assert any(name.endswith("scale_weight") for name in host_addresses)
    seen, _ = placement_checker(dit, blocks_on_host, host_addresses, original)
    assert torch.equal(run(dit), expected)
    assert seen == list(range(LAYERS)) and addresses(dit) == host_addresses
    assert dit.blocks[-1].attn1.to_q.weight.dtype == torch.float8_e4m3fn


def q8_0_bytes(out_features, in_features, seed):
    """GGML Q8_0 rows by hand: per 32 values an fp16 scale then 32 int8 quants."""
    gen = torch.Generator().manual_seed(seed)
    blocks = out_features * in_features // 32
    scales = (torch.rand(blocks, 1, generator=gen) * 0.01).half().view(torch.uint8)
    quants = torch.randint(-127, 128, (blocks, 32), generator=gen, dtype=torch.int8).view(torch.uint8)
    return torch.cat([scales, quants], dim=1).reshape(out_features, in_features // 32 * 34)


def test_gguf_packed_weights_are_swapped():
    from bernini_core.gguf.layers import GGUFLinear

    dit = make_dit()
    for i, block in enumerate(dit.blocks):
        dense = block.ffn.net[2]
        layer = GGUFLinear(dense.in_features, dense.out_features)
        packed = q8_0_bytes(dense.out_features, dense.in_features, seed=i)
        layer.expect_packed(8, packed.shape)  # GGML type 8 = Q8_0
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)
        layer.bias = dense.bias
        block.ffn.net[2] = layer
    expected = run(dit)
    original = values(dit)
    enable_block_swap(dit, 3, "cpu")
    host_addresses = addresses(dit)
    seen, _ = placement_checker(dit, 3, host_addresses, original)
    assert torch.equal(run(dit), expected)
    assert seen == list(range(LAYERS)) and addresses(dit) == host_addresses
    assert dit.blocks[-1].ffn.net[2].weight.dtype == torch.uint8


@pytest.mark.parametrize("bad", [-1, LAYERS + 1, 1.5, True, "2"])
def test_bad_block_count_is_refused_naming_the_range(bad):
    dit = make_dit()
    for call in (enable_block_swap, memory_plan):
        with pytest.raises(BerniniError, match=rf"blocks_on_host=.*from 0 .* to {LAYERS}"):
            call(dit, bad, "cpu") if call is enable_block_swap else call(dit, bad)
    assert getattr(dit, "block_swap", None) is None


def test_refused_with_sequence_parallel_or_fsdp(monkeypatch):
    dit = make_dit()
    dit.sequence_parallel = object()  # what use_sequence_parallel stores
    with pytest.raises(BerniniError, match="sequence parallel"):
        enable_block_swap(dit, 1, "cpu")
    dit.sequence_parallel = None

    swap = enable_block_swap(dit, 1, "cpu")
    dit.sequence_parallel = object()  # set after enabling: refused at the next forward
    with pytest.raises(BerniniError, match="sequence parallel"):
        list(swap.blocks())
    dit.sequence_parallel = None
    disable_block_swap(dit)

    from bernini_core.parallel import fsdp

    monkeypatch.setattr(fsdp, "is_sharded", lambda module: module is dit.blocks[0])
    with pytest.raises(BerniniError, match="FSDP"):
        enable_block_swap(dit, 1, "cpu")


def test_disable_restores_the_plain_model(expected):
    dit = make_dit()
    swap = enable_block_swap(dit, 3, "cpu")
    run(dit)
    schedule = list(swap.schedule)
    assert disable_block_swap(dit) is True
    assert getattr(dit, "block_swap", None) is None
    assert all(t.device.type == "cpu" for t in tensors_of(dit).values())
    assert torch.equal(run(dit), expected)
    assert swap.schedule == schedule  # the forward no longer goes through the swap
    with pytest.raises(BerniniError, match="disabled"):
        list(swap.blocks())
    assert disable_block_swap(dit) is False


def test_weights_replaced_after_enabling_are_refused():
    dit = make_dit()
    enable_block_swap(dit, 1, "cpu")
    layer = dit.blocks[-1].attn1.to_q
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    with pytest.raises(BerniniError, match="disable_block_swap"):
        run(dit)


def test_a_forward_that_fails_midway_leaves_a_working_swap(expected):
    dit = make_dit()
    enable_block_swap(dit, 2, "cpu")
    host_addresses = addresses(dit)

    def fail(*_):
        raise RuntimeError("interrupted")

    handle = dit.blocks[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(dit)  # blocks 2 and 3 were staged when it failed
    handle.remove()
    assert torch.equal(run(dit), expected)
    assert addresses(dit) == host_addresses


@pytest.mark.parametrize("blocks_on_host", [0, 1, 3, LAYERS])
def test_memory_plan_counts_block_bytes(blocks_on_host):
    dit = make_dit()
    nbytes = {name: t.numel() * t.element_size() for name, t in dit.state_dict().items()}
    host = {f"blocks.{i}." for i in swapped_indices(blocks_on_host)}
    on_host = sum(n for name, n in nbytes.items() if any(name.startswith(p) for p in host))
    block_bytes = sum(n for name, n in nbytes.items() if name.startswith("blocks.0."))
    plan = memory_plan(dit, blocks_on_host)
    assert plan["host_bytes"] == plan["transfer_bytes_per_forward"] == on_host
    assert plan["device_bytes"] == sum(nbytes.values()) - on_host
    staging = plan["device_peak_bytes"] - plan["device_bytes"]
    tensors_per_block = len(tensors_of(dit.blocks[0]))
    buffers = min(blocks_on_host, 2)
    assert buffers * block_bytes <= staging <= buffers * (block_bytes + 256 * tensors_per_block)


def happens_before(log):
    """For each GPU operation of a pass (copy of block j on the side stream; run / release of block j on the main
    stream), the set of operations ordered before it, from stream order plus event record / wait (CUDA semantics:
    a wait orders after the event's latest record)."""
    known, recorded, before, prefetching, copies = {"main": set(), "side": set()}, {}, {}, None, 0

    def op(stream, name):
        before[name] = set(known[stream])
        known[stream].add(name)

    for entry in log:
        kind = entry[0]
        if kind == "prefetch":
            prefetching = entry[1]
        elif kind == "copied":
            copies += 1
            op("side", ("copy", prefetching, copies))
        elif kind in ("run", "release"):
            op("main", entry)
        elif kind == "record":
            recorded[entry[2]] = set(known[entry[1]])
        elif kind == "wait_event":
            known[entry[1]] |= recorded.get(entry[2], set())
    return before


def test_cuda_stream_schedule_orders_copies_and_buffer_reuse_with_events(monkeypatch):
    """The CUDA branch run with recording stand-ins for streams and events (copies stay CPU copies): every block's
    copy is ordered before it runs, and a staging buffer is overwritten only after the block that used it ran."""
    import contextlib
    import itertools

    dit = make_dit()
    swap = enable_block_swap(dit, LAYERS, "cpu")
    ids = itertools.count()

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            swap.schedule.append(("wait_event", self.name, event.id))

    class Event:
        def __init__(self):
            self.id = next(ids)

        def record(self, stream):
            swap.schedule.append(("record", stream.name, self.id))

    side_stream_active = []

    @contextlib.contextmanager
    def on_stream(stream):
        assert stream is swap._stream
        side_stream_active.append(True)
        yield
        side_stream_active.pop()

    tensor_copy = torch.Tensor.copy_

    def copy_(self, *args, **kwargs):
        if side_stream_active:
            swap.schedule.append(("copied",))
        return tensor_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    swap._stream = Stream("side")
    assert torch.equal(run(dit), run(make_dit()))
    before = happens_before(swap.schedule)
    copies = [name for name in before if name[0] == "copy"]
    assert len(copies) == LAYERS * len(tensors_of(dit.blocks[0]))  # every tensor copied on the side stream
    for copy in copies:
        j = copy[1]
        assert copy in before[("run", j)], f"block {j} may run before its weights arrived"
        if j >= 2:  # block j reuses the staging buffer of block j - 2
            assert ("run", j - 2) in before[copy], f"block {j}'s copy may overwrite block {j - 2}'s weights"
