"""RoPE as real float64 arithmetic on cached cos/sin tables (renderer/rope.py) against the official complex128 form.

The reference here is written from docs/official_behaviour.md §4.3 alone: per-axis angles pos * theta^(-2k/d_axis)
over the t/h/w split, times the source phase sid * theta^(-2k/head_dim), as complex128 unit numbers; q/k pairs
(x[2k], x[2k+1]) viewed as complex128, multiplied, cast back.
"""

import pytest
import torch

from bernini_core.renderer.rope import RopeTableCache, apply_rope, rotate_complex, rotate_real

THETA = 10000.0


def reference_table(grid, sid, head_dim):
    """complex128 [T*H*W, head_dim/2], built independently of bernini_core.renderer.rope."""
    side = 2 * (head_dim // 6)
    dims = (head_dim - 2 * side, side, side)

    def unit(positions, dim):
        inverse = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        angles = positions.to(torch.float64)[:, None] * inverse[None, :]
        return torch.polar(torch.ones_like(angles), angles)

    frames, rows, cols = grid
    t, h, w = (unit(torch.arange(n), d) for n, d in zip(grid, dims))
    table = torch.cat([t[:, None, None].expand(frames, rows, cols, -1), h[None, :, None].expand(frames, rows, cols, -1),
                       w[None, None, :].expand(frames, rows, cols, -1)], dim=-1).reshape(frames * rows * cols, -1)
    if sid != 0.0:
        table = table * unit(torch.tensor([sid]), head_dim)
    return table


def reference_rope(x, table):
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * table[None, :, None, :]).reshape(x.shape).to(x.dtype)


LAYOUTS = [  # (grids, source ids): one stream; an image + a video source + target with a float32 linspace id
    ([(3, 4, 5)], [0.0]),
    ([(1, 4, 4), (2, 3, 4), (2, 4, 6)], [1.0, 1.7999999523162842, 0.0]),
]


@pytest.mark.parametrize("head_dim", [24, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["single", "sources"])
def test_real_rotation_is_bit_identical_to_complex128(head_dim, dtype, layout):
    grids, sids = layout
    table = RopeTableCache(head_dim, 64).get(grids, sids, "cpu")
    expected_table = torch.cat([reference_table(g, s, head_dim) for g, s in zip(grids, sids)])
    assert table.dtype == torch.float64 and not table.is_complex() and table.shape == (len(expected_table), head_dim)
    # the cached tables are the complex128 table's parts (built the official way), not a re-derivation
    assert (table[:, 0::2] - expected_table.real).abs().max() <= 1e-15
    assert (table[:, 1::2] - expected_table.imag).abs().max() <= 1e-15
    gen = torch.Generator().manual_seed(head_dim)
    # magnitudes over 6 decades, so both large and tiny pairs are exercised
    x = (torch.randn(2, len(table), 3, head_dim, generator=gen) * torch.logspace(-3, 3, head_dim)).to(dtype)
    expected = reference_rope(x, expected_table)
    # eager (complex view of the table) and the real-arithmetic form torch.compile traces; measured: max |difference|
    # 0 (bit-identical) for every case here
    for rotate in (apply_rope, rotate_complex, rotate_real):
        out = rotate(x, table)
        assert out.dtype == dtype
        assert torch.equal(out, expected), (rotate.__name__, (out.double() - expected.double()).abs().max())
    assert not torch.equal(out, x)  # the rotation is not a no-op


def test_tables_are_built_once_per_layout_and_shared():
    cache = RopeTableCache(24, 64)
    first = cache.get([(2, 3, 4)], [0.0], "cpu")
    assert cache.get([(2, 3, 4)], [0.0], "cpu") is first and cache.builds == 1
    cache.get([(2, 3, 4)], [1.0], "cpu")
    assert cache.builds == 2


def _graph_dtypes(fn, *args):
    """dtypes of every value in the graph(s) dynamo traces for fn(*args)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=keep, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    values = [node.meta.get("example_value") for gm in graphs for node in gm.graph.nodes]
    return {v.dtype for v in values if isinstance(v, torch.Tensor)}


def test_eager_rotation_uses_the_complex_product(monkeypatch):
    import bernini_core.renderer.rope as rope

    calls = []
    monkeypatch.setattr(rope, "rotate_complex", lambda x, t: calls.append("complex") or x)
    monkeypatch.setattr(rope, "rotate_real", lambda x, t: calls.append("real") or x)
    table = RopeTableCache(24, 64).get([(2, 3, 4)], [1.0], "cpu")
    rope.apply_rope(torch.randn(1, 24, 2, 24), table)
    assert calls == ["complex"]  # fewest bytes moved in eager; the real form is for the compiler


def test_compiled_rotation_has_no_complex_tensors():
    table = RopeTableCache(24, 64).get([(2, 3, 4)], [1.0], "cpu")
    x = torch.randn(1, 24, 2, 24).to(torch.bfloat16)
    dtypes = _graph_dtypes(apply_rope, x, table)
    assert torch.float64 in dtypes and not any(d.is_complex for d in dtypes), dtypes
    # the check can fail: the complex128 form traces complex values
    assert any(d.is_complex for d in _graph_dtypes(reference_rope, x, reference_table((2, 3, 4), 1.0, 24)))
