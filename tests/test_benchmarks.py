"""The benchmark scripts run on the tiny config and their FLOP formula matches the spec's anchor."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_renderer_flops_match_the_spec_anchor():
    bench = load("renderer")
    # wan_qwen.md §5.1: A14B, 81 frames 480x832 (32,760 tokens), 512 text rows -> 1,678.4 TFLOP per forward.
    assert abs(bench.forward_flops(bench.WAN22_A14B, 32760, 512) / 1e12 - 1678.3) < 0.5


def test_renderer_benchmark_prints_a_table(capsys):
    load("renderer").main(["--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "| time per forward (median)" in out and "| FLOPs per forward" in out and "| peak memory" in out
