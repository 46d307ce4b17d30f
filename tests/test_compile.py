"""Regional torch.compile of the DiT blocks (bernini_core/acceleration/compile.py) and the fp8 _scaled_mm gate.

Equality runs on backend "aot_eager" (dynamo + AOTAutograd tracing, eager kernels): exact, fast, no compiler. The
inductor test is opt-in (BERNINI_TEST_INDUCTOR=1): with a cold inductor cache it takes ~50 s on 2 CPU cores.
"""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from bernini_core.acceleration.compile import (
    RECOMPILE_LIMIT, CompileSettings, block_explanation, compile_blocks, explain_block, uncompile_blocks,
)
from bernini_core.errors import BerniniError
from bernini_core.quant import Fp8ScaledLinear, fp8_matmul_supported, fp8_ops, is_fp8, prepare_fp8_matmul
from bernini_core.renderer import BerniniDiT, DiTConfig
from bernini_core.renderer.transformer import is_fp32_param
from bernini_core.tiny import TINY_DIT

CFG = DiTConfig.from_dict(TINY_DIT)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_dit(weights: str) -> BerniniDiT:
    """Seeded tiny DiT: "fp32", "bf16" (fp32 islands kept, as Bernini-R) or "fp8" (every Linear fp8 e4m3 with a
    per-tensor scale, the rest bf16, built through quant.fp8_ops as the keep-fp8 loader does)."""
    torch.manual_seed(0)
    plain = BerniniDiT(CFG).eval()
    if weights == "fp32":
        return plain
    dit = BerniniDiT(CFG, ops=fp8_ops()).eval() if weights == "fp8" else plain
    if dit is not plain:
        dit.load_state_dict(plain.state_dict(), strict=False)  # the plain model has no scale_weight buffers
    with torch.no_grad():
        for module in dit.modules():
            if weights == "fp8" and isinstance(module, Fp8ScaledLinear):
                scale = module.weight.abs().amax() / 448.0
                module.weight = torch.nn.Parameter((module.weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
                module.scale_weight.copy_(scale)
        for name, param in dit.named_parameters():
            if not is_fp8(param) and not is_fp32_param(name):
                param.data = param.data.to(torch.bfloat16)
    return dit


def forward_inputs(frames=2, rows=4, cols=6, sources=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    streams = [torch.randn(1, 16, 1, 4, 4, generator=gen) for _ in range(sources)]
    streams.append(torch.randn(1, 16, frames, rows, cols, generator=gen))
    return streams, [float(i + 1) for i in range(sources)] + [0.0], torch.tensor([500.0]), torch.randn(1, 20, 32,
                                                                                                          generator=gen)


# ----------------------------------------------------------------------------- graph breaks
@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp8"])
def test_a_block_has_no_graph_breaks(weights):
    dit = make_dit(weights)
    report = block_explanation(dit, forward_inputs(sources=1))
    assert report.graph_break_count == 0 and report.graph_count == 1, [r.reason for r in report.break_reasons]
    if weights == "fp8":  # the dequantise path on CPU; tracing decided nothing (decisions happen in eager only)
        assert all(m._fp8_matmul_state is None for m in dit.blocks.modules() if isinstance(m, Fp8ScaledLinear))


def test_fp8_scaled_mm_path_has_no_graph_breaks():
    dit = make_dit("fp8")
    # CPU has a _scaled_mm kernel; pretend the device gate passed, so the verified fp8 matmul path is what is traced
    counts = prepare_fp8_matmul(dit, "cpu", torch.bfloat16, supported=True)
    assert counts == {"scaled_mm": 26, "dequantize": 0}  # 2 blocks x 10 + time 3 + text 2 + proj_out 1
    assert explain_block(dit, forward_inputs()) == 0


def test_graph_break_check_catches_a_host_sync(monkeypatch):
    from bernini_core.renderer import transformer

    original = transformer.DiTBlock.forward

    def with_item(self, x, *args, **kwargs):
        if x.abs().max().item() > 1e30:  # a host sync, as a stray `.item()` in the block would be
            x = x * 0.5
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(transformer.DiTBlock, "forward", with_item)
    assert explain_block(make_dit("fp32"), forward_inputs()) == 1


# ----------------------------------------------------------------------------- compiled == eager
@pytest.mark.parametrize("weights", ["bf16", "fp8"])  # fp32: test_a_new_shape_recompiles_once...
def test_compiled_blocks_equal_eager_and_share_one_graph(weights):
    dit = make_dit(weights)
    inputs = forward_inputs(sources=1)
    with torch.no_grad():
        eager = dit(*inputs)
        counter = CompileCounterWithBackend("aot_eager")
        compile_blocks(dit, backend=counter)
        probes = counter.frame_count  # compile_blocks checks the backend on a tiny function first
        compiled = dit(*inputs)
    assert torch.equal(compiled, eager)
    assert counter.frame_count - probes == 1  # both blocks run the one compiled graph


def test_a_new_shape_recompiles_once_and_still_matches_eager():
    dit = make_dit("fp32")
    small, large = forward_inputs(), forward_inputs(frames=3, rows=6, cols=4, sources=1, seed=2)
    with torch.no_grad():
        eager = [dit(*small), dit(*large)]
        counter = CompileCounterWithBackend("aot_eager")
        compile_blocks(dit, backend=counter)
        start = counter.frame_count
        compiled = [dit(*small), dit(*large)]
        assert counter.frame_count - start == 2  # one compile per layout, shared by both blocks
        again = [dit(*small), dit(*large)]
        assert counter.frame_count - start == 2  # known layouts hit the cache
    for got, repeat, want in zip(compiled, again, eager):
        assert torch.equal(got, want) and torch.equal(repeat, want)


def test_compile_is_idempotent_records_settings_and_can_be_undone():
    dit = make_dit("fp32")
    compile_blocks(dit, backend="aot_eager")
    assert dit.compiled_blocks == CompileSettings("aot_eager", None, False)
    wrapped = [block._compiled_call_impl for block in dit.blocks]
    assert all(w is not None for w in wrapped)
    compile_blocks(dit, backend="aot_eager")  # same settings: nothing re-wrapped
    assert [block._compiled_call_impl for block in dit.blocks] == wrapped
    compile_blocks(dit, backend="eager")
    assert dit.compiled_blocks.backend == "eager" and dit.blocks[0]._compiled_call_impl is not wrapped[0]
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    assert limit >= RECOMPILE_LIMIT
    uncompile_blocks(dit)
    assert dit.compiled_blocks is None and all(block._compiled_call_impl is None for block in dit.blocks)


def test_compile_errors_name_the_fix():
    dit = make_dit("fp32")
    with pytest.raises(BerniniError, match="aot_eager"):
        compile_blocks(dit, backend="no_such_backend")
    with pytest.raises(BerniniError, match="inductor option"):
        compile_blocks(dit, backend="aot_eager", mode="max-autotune")
    with pytest.raises(BerniniError, match="BerniniDiT"):
        compile_blocks(torch.nn.Linear(2, 2))
    dit.block_swap = object()  # what acceleration/block_swap.py attaches
    with pytest.raises(BerniniError, match="max-autotune-no-cudagraphs"):
        compile_blocks(dit, mode="reduce-overhead")
    del dit.block_swap

    def broken_toolchain(gm, example_inputs):
        raise RuntimeError("C++ compile error: no compiler found")

    with pytest.raises(BerniniError, match=r"does not work on cpu \(RuntimeError: C\+\+ .*no compiler found\)"
                                           r".*backend='aot_eager'"):
        compile_blocks(dit, backend=broken_toolchain)
    assert getattr(dit, "compiled_blocks", None) is None and dit.blocks[0]._compiled_call_impl is None


@pytest.mark.skipif(os.environ.get("BERNINI_TEST_INDUCTOR") != "1",
                    reason="inductor on CPU: ~50 s with a cold cache (set BERNINI_TEST_INDUCTOR=1)")
def test_inductor_blocks_match_eager():
    dit = make_dit("fp32")
    inputs = forward_inputs(sources=1)
    with torch.no_grad():
        eager = dit(*inputs)
        compile_blocks(dit, backend="inductor")
        compiled = dit(*inputs)
    # fused fp32 kernels reorder sums: a few ulp of the output scale (measured 6e-7 of max|out| ~2)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()


# ----------------------------------------------------------------------------- fp8 _scaled_mm gate
def fp8_layer(in_features=64, out_features=32, fmt=torch.float8_e4m3fn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = Fp8ScaledLinear(in_features, out_features, bias=True)
    weight = torch.randn(out_features, in_features, generator=gen)
    scale = weight.abs().amax() / torch.finfo(fmt).max
    layer.weight = torch.nn.Parameter((weight / scale).to(fmt), requires_grad=False)
    layer.scale_weight.copy_(scale)
    layer.bias.data = torch.randn(out_features, generator=gen)
    return layer


def dequantized(layer, x):
    weight = (layer.weight.float() * layer.scale_weight).to(x.dtype)  # written out, not layer.dequantized_weight
    return torch.nn.functional.linear(x, weight, layer.bias.to(x.dtype))


def test_fp8_matmul_device_gate(monkeypatch):
    assert not fp8_matmul_supported("cpu")
    for capability, expected in (((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_matmul_supported("cuda:0") is expected
    monkeypatch.delattr(torch, "_scaled_mm")
    assert not fp8_matmul_supported("cuda:0")


@torch.no_grad()
def test_fp8_matmul_is_verified_once_per_shape_then_used():
    model = torch.nn.Sequential(fp8_layer(seed=0), fp8_layer(32, 64, seed=1), fp8_layer(seed=2))
    calls = []
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real(*args, **kwargs)

    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch._scaled_mm = counting
    try:
        assert prepare_fp8_matmul(model, "cpu", torch.bfloat16, supported=True) == {"scaled_mm": 3, "dequantize": 0}
        assert sorted(calls) == [(32, 64), (64, 32)]  # one verification per distinct layer shape
        out = model[0](x)
        assert len(calls) == 3  # the forward now runs _scaled_mm ...
    finally:
        torch._scaled_mm = real
    reference = dequantized(model[0], x).float()
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1  # ... with fp8 activations: close to, not equal to, the dequantised product
    # prepared layers are not verified again; a reset one (LoRA merge) is
    model[1]._fp8_matmul_state = None
    torch._scaled_mm = counting
    try:
        prepare_fp8_matmul(model, "cpu", torch.bfloat16, supported=True)
    finally:
        torch._scaled_mm = real
    assert len(calls) == 4 and calls[-1] == (32, 64)  # model[1]: weight [64, 32], passed transposed


@torch.no_grad()
@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_fp8_matmul_falls_back_to_dequantise_when_verification_fails(monkeypatch, failure):
    def broken(x_fp8, weight_t, **kwargs):
        if failure == "raises":
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return torch.zeros(x_fp8.shape[0], weight_t.shape[1], dtype=kwargs["out_dtype"])

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    layer = fp8_layer()
    assert prepare_fp8_matmul(layer, "cpu", torch.bfloat16, supported=True) == {"scaled_mm": 0, "dequantize": 1}
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), dequantized(layer, x))


@torch.no_grad()
def test_fp8_matmul_gate_refuses_without_calling_the_kernel(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("_scaled_mm called for an ineligible layer")

    monkeypatch.setattr(torch, "_scaled_mm", must_not_run)
    cases = [  # (layer, activation dtype, device check answer)
        (fp8_layer(), torch.bfloat16, None),  # CPU: the real device check says no
        (fp8_layer(), torch.bfloat16, False),  # cc < 8.9
        (fp8_layer(fmt=torch.float8_e5m2), torch.bfloat16, True),  # e5m2 weights
        (fp8_layer(40, 32), torch.bfloat16, True),  # in_features not a multiple of 16
        (fp8_layer(), torch.float32, True),  # fp32 activations
    ]
    for layer, dtype, supported in cases:
        assert prepare_fp8_matmul(layer, "cpu", dtype, supported=supported)["dequantize"] == 1
        x = torch.randn(2, layer.in_features).to(dtype)
        assert torch.equal(layer(x), dequantized(layer, x))
    lazy = fp8_layer()  # no prepare: the first eager bf16 call decides, on CPU without the kernel
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(lazy(x), dequantized(lazy, x)) and lazy._fp8_matmul_state is False
