"""The benchmark scripts run on the tiny config and their FLOP formula matches the anchor of docs/wan_qwen.md §5.1."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_renderer_flops_match_the_spec_anchor():
    bench = load("renderer")
    # docs/wan_qwen.md §5.1: A14B, 81 frames 480x832 (32,760 tokens), 512 text rows -> 1,678.4 TFLOP per forward.
    assert abs(bench.forward_flops(bench.WAN22_A14B, 32760, 512) / 1e12 - 1678.3) < 0.5


def test_renderer_benchmark_prints_a_table(capsys):
    load("renderer").main(["--repeats", "1", "--warmup", "0", "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "| time per forward (median)" in out and "| FLOPs per forward" in out and "| peak memory" in out


def test_renderer_benchmark_weight_formats():
    """Each format's model really holds its weights that way (fp8 bytes, packed GGUF blocks), so the table's bytes
    are the real resident sizes; Q8_0 blocks of 32 pack the tiny DiT's 48-wide layers."""
    bench = load("renderer")
    cfg = bench.load_config("tiny")
    device = torch.device("cpu")
    sizes = {fmt: bench.weight_bytes(bench.build_model(cfg, fmt, device, torch.float32, True))
             for fmt in ("fp32", "bf16", "fp8", "q8_0")}
    assert sizes["fp8"] < sizes["bf16"] < sizes["fp32"] and sizes["q8_0"] < sizes["fp32"]
    q8 = bench.build_model(cfg, "q8_0", device, torch.float32, True)
    packed = [m for m in q8.modules() if getattr(m, "bernini_quantized", False)]
    assert packed and all(m.weight.dtype == torch.uint8 for m in packed)
    fp8 = bench.build_model(cfg, "fp8", device, torch.float32, True)
    assert fp8.proj_out.weight.dtype == torch.float8_e4m3fn


def _tiny_flops(tokens: int, rows: int = 512) -> float:
    """docs/wan_qwen.md §5.1 written out for the tiny config (D = 48, F = 64, 2 blocks)."""
    d, f = 48, 64
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 4 * rows * d * d
    return 2 * (linear + 4 * tokens * tokens * d + 4 * tokens * rows * d)


def test_renderer_presets_give_the_real_token_counts():
    bench = load("renderer")
    cases = bench.cases_from(bench.parse_args(["--preset", "480p,720p", "--sources", "0,1"]))
    # 81 frames -> 21 latent frames; 480x832 -> 30x52 patches, 720x1280 -> 45x80; one source doubles the tokens
    assert [(c.height, c.width, c.frames, c.sources, c.tokens(bench.WAN22_A14B)) for c in cases] == [
        (480, 832, 81, 0, 21 * 30 * 52), (480, 832, 81, 1, 2 * 21 * 30 * 52),
        (720, 1280, 81, 0, 21 * 45 * 80), (720, 1280, 81, 1, 2 * 21 * 45 * 80)]


def test_renderer_scales_k_blocks_to_the_whole_model(tmp_path, capsys):
    """--blocks 1 of the tiny config's 2: time = t0 + (t_1 - t0)·2, FLOPs of both blocks, both streams' rows,
    and the markdown / JSON files say it is scaled."""
    bench = load("renderer")
    md, js = tmp_path / "perf.txt", tmp_path / "perf.json"
    bench.main(["--device", "cpu", "--dtype", "fp32", "--blocks", "1", "--sources", "0,1", "--warmup", "0",
                "--repeats", "1", "--markdown", str(md), "--json", str(js)])
    rows = json.loads(js.read_text())["rows"]
    assert [(r["tokens"], r["impl"], r["mode"]) for r in rows] == [(48, "bernini", "eager"), (96, "bernini", "eager")]
    for r in rows:  # 64x64x9: 3 latent frames x 4 x 4 patches per stream
        assert abs(r["ms_forward"] - (r["ms_no_blocks"] + (r["ms_measured"] - r["ms_no_blocks"]) * 2)) < 1e-9
        assert r["flops"] == _tiny_flops(r["tokens"])
        assert abs(r["tflops"] - r["flops"] / (r["ms_forward"] / 1e3) / 1e12) < 1e-12
    text = md.read_text()
    assert "SCALED: 1 of 2 blocks" in text and "## Yardstick" in text and "| time per forward (median)" in text
    assert "| 9x64x64 | 2       | 96 " in capsys.readouterr().out


def test_renderer_diffusers_side_by_side_computes_the_same_function(tmp_path):
    """diffusers' WanTransformer3DModel gets our weights: in fp32 its output equals ours to rounding; for one source
    stream it runs one stream of twice the frames (same token count) and states no error."""
    pytest.importorskip("diffusers")
    bench = load("renderer")
    js = tmp_path / "perf.json"
    bench.main(["--device", "cpu", "--dtype", "fp32", "--sources", "0,1", "--warmup", "0", "--repeats", "1",
                "--diffusers", "--strict", "--json", str(js)])
    rows = {(r["impl"], r["sources"]): r for r in json.loads(js.read_text())["rows"]}
    assert rows["diffusers", 0]["rel_error_vs_bernini"] < 1e-5
    assert rows["diffusers", 1]["tokens"] == rows["bernini", 1]["tokens"] == 96
    assert "rel_error_vs_bernini" not in rows["diffusers", 1] and "same tokens" in rows["diffusers", 1]["note"]


def test_renderer_compiled_rows_report_compile_time(monkeypatch):
    """A compiled row's first call (where compilation happens) is never timed, even with --warmup 0, and the extra
    time of that call is the reported compile time (torch.compile is stubbed: tests/test_compile.py covers it)."""
    bench = load("renderer")
    compiled = []
    monkeypatch.setattr(bench, "compile_model", lambda model, impl, backend, mode: compiled.append(impl) or "stub")
    calls = []
    real = bench.time_calls
    monkeypatch.setattr(bench, "time_calls", lambda fn, device, warmup, repeats: calls.append(warmup) or
                        real(fn, device, warmup, repeats))
    runner = bench.Bench(bench.parse_args(["--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--repeats", "1",
                                           "--strict"]), log=lambda _: None)
    runner.run_bernini("fp32", modes=["compiled"])
    (row,) = runner.rows
    assert compiled == ["bernini"] and calls == [1] and row["mode"] == "compiled" and "stub" in row["note"]
    assert row["compile_s"] == max(row["first_call_s"] - row["ms_measured"] / 1e3, 0.0) and row["ms_forward"] > 0


def test_renderer_block_swap_table(tmp_path):
    """N of L blocks on the host: with K = L measured (bit-equal to no swap); with K < L extrapolated from the K-block
    model's per-block times, host bytes = N whole blocks."""
    bench = load("renderer")
    from bernini_core.renderer.transformer import BerniniDiT

    block = BerniniDiT(bench.load_config("tiny")).blocks[0]
    block_bytes = sum(t.numel() * t.element_size() for t in block.state_dict().values())  # fp32
    measured = bench.main(["--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--repeats", "1",
                           "--block_swap", "0,1,2"])["block_swap"]
    assert [(r["blocks_on_host"], r["method"]) for r in measured] == [(0, "measured"), (1, "measured"),
                                                                      (2, "measured")]
    assert all(r["max_abs_diff_vs_no_swap"] == 0 for r in measured)
    assert [round(r["host_weights_gib"] * 2**30) for r in measured] == [0, block_bytes, 2 * block_bytes]
    scaled = bench.main(["--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--repeats", "1", "--blocks", "1",
                         "--block_swap", "0,2"])["block_swap"]
    assert [r["method"] for r in scaled] == ["from 1-block timings"] * 2
    for r in scaled:
        n = r["blocks_on_host"]
        t0 = scaled[0]["ms_forward"] - 2 * r["ms_block_resident"]
        assert abs(r["ms_forward"] - (t0 + (2 - n) * r["ms_block_resident"] + n * r["ms_block_swapped"])) < 1e-6
        assert round(r["host_weights_gib"] * 2**30) == n * block_bytes


# -- benchmarks/planner.py ------------------------------------------------------------------------
PLANNER_PROMPT = "a red fox runs through fresh snow"


def _template_length(tokenizer, system: str, user: str, n_target: int) -> int:
    """Branch length from the docs/official_behaviour.md §3.3 layout: "<|im_start|>{role}\\n" + content per message, no
    <|im_end|>, the target written <|vision_start|> + N pads + <|vision_end|>."""
    def count(text):
        return len(tokenizer.encode(text, add_special_tokens=False))

    return (count("<|im_start|>system\n") + count(system) + count("<|im_start|>user\n") + count(user)
            + count("<|im_start|>assistant\n") + n_target + 2)


def test_planner_benchmark_prints_a_table(capsys, tmp_path):
    import json

    import math

    from transformers import AutoTokenizer

    from bernini_core.planner.tiny_mllm import write_tiny_mllm_assets

    summary = load("planner").main([
        "--device", "cpu", "--task", "t2v", "--prompt", PLANNER_PROMPT, "--frames", "5", "--height", "64",
        "--width", "64", "--planning_step", "2", "--vit_denoising_step", "1", "--num_inference_steps", "1"])
    out = capsys.readouterr().out
    for row in ("| time per MLLM forward (mean)", "| time per planning step (mean)", "| sequence length cond",
                "| planner vs renderer share", "| peak memory", "| planning (MaskGIT + final forwards)",
                "| rendering (DiT denoising)", "| total"):
        assert row in out, row

    # Target tokens (docs/official_behaviour.md §3.2): Qwen smart resize (round to factor 28, then fit 3136..50176 px)
    # of 64x64 -> 56x56, a 4x4 patch grid; 5 frames at 16 fps sampled at fps // 8 = 2 -> the 2-frame minimum -> one
    # temporal patch; 2x2 merge -> 4 tokens.
    h = w = round(64 / 28) * 28
    if h * w < 3136:
        h = w = math.ceil(64 * math.sqrt(3136 / 64 ** 2) / 28) * 28
    n_target = 1 * (h // 14) * (w // 14) // 4
    assert n_target == 4 and summary["target_tokens"] == n_target

    prompts = json.loads((ROOT / "bernini_core" / "data" / "bernini_prompts.json").read_text(encoding="utf-8"))
    system = prompts["planner_system_prompts"]["t2v"]
    negative = prompts["negative_prompts"]["default_zh"]  # v1 t2v preset's negative (docs/official_behaviour.md §5.1)
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_mllm_assets(tmp_path / "mllm"))
    expected = {"cond": _template_length(tokenizer, system, PLANNER_PROMPT, n_target),
                "imgcond": _template_length(tokenizer, system, PLANNER_PROMPT, n_target),  # t2v: no sources to drop
                "uncond": _template_length(tokenizer, system, negative, n_target)}
    assert summary["branch_tokens"] == expected
    assert f"| {expected['cond']:,} / {expected['imgcond']:,} / {expected['uncond']:,} tokens |" in out

    # docs/official_behaviour.md §3.5: 3 forwards per planning step + 2 final. With N = 4 and 2 steps both steps reveal
    # two tokens (mask_len = floor(4 cos(pi/4)) = 2), so neither can hit the docs/official_behaviour.md §7.2 "nothing
    # revealed" skip.
    assert summary["forwards"] == 3 * 2 + 2 and summary["loop_forwards"] == 6 and summary["skipped_steps"] == 0
    assert len(summary["step_seconds"]) == 2 and all(s > 0 for s in summary["step_seconds"])
    assert abs(sum(summary["stage_seconds"].values()) - summary["total_seconds"]) < 1e-9


def test_planner_flops_match_the_qwen_anchor_and_a_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLConfig

    from bernini_core.planner.model import PlannerModel
    from bernini_core.planner.tiny_mllm import tiny_qwen_config

    bench = load("planner")
    # docs/wan_qwen.md §5.1: Qwen2.5-VL-7B prefill ~ 2 * 7.6e9 FLOP per token = 2 x every parameter. Per token the
    # formula over all 28 layers counts the decoder matmul weights twice; embedding + untied head add 2·V·D.
    cfg = bench.QWEN25_VL_7B_TEXT
    per_token = bench.mllm_forward_flops(cfg, 1, layers=cfg["num_hidden_layers"])
    params = per_token / 2 + 2 * cfg["vocab_size"] * cfg["hidden_size"]
    assert abs(params / 7.6e9 - 1) < 0.01, params
    # The planner stops before the last layer (hidden_states[-2], docs/official_behaviour.md §3.1): 27 of 28 layers.
    assert bench.mllm_forward_flops(cfg, 1) == per_token * 27 / 28

    # Tiny Qwen with eager attention (plain matmuls, which the counter sees): PlannerModel.hidden on L tokens.
    config = Qwen2_5_VLConfig(**tiny_qwen_config(num_layers=3))
    planner = PlannerModel.build(config, num_mask_tokens=8, gen_dim=32, decoder_width=16, decoder_depth=1,
                                 mllm_dtype=torch.float32, attn_implementation="eager")
    length = 40
    mask = torch.triu(torch.full((length, length), float("-inf")), 1).view(1, 1, length, length)
    positions = torch.arange(length).view(1, 1, length).expand(3, 1, length)
    with FlopCounterMode(display=False) as counter:
        planner.hidden(torch.randn(1, length, planner.hidden_size), None, attention=(mask, positions))
    expected = bench.mllm_forward_flops(planner.language_model.config, length)
    # equal on torch 2.13 (a counted rotary-angle product, 3·head_dim·L, would add < 0.1%)
    assert abs(counter.get_total_flops() / expected - 1) < 1e-3, (counter.get_total_flops(), expected)


# -- benchmarks/parallel.py -----------------------------------------------------------------------

def test_gpu_checks_keep_going_after_a_failing_section(tmp_path, monkeypatch):
    """The one-command GPU script: a section that raises is reported and the next one still runs and is written."""
    checks = load("gpu_checks")

    def broken(ctx):
        raise RuntimeError("kernel missing")

    monkeypatch.setattr(checks, "SECTIONS", {**checks.SECTIONS, "a": broken})
    report = checks.main(["--quick", "--device", "cpu", "--sections", "ad", "--out", str(tmp_path)])
    assert report["sections"]["a"]["error"] == "RuntimeError: kernel missing"
    rows = report["sections"]["d"]["result"]["rows"]
    assert [r["blocks_on_host"] for r in rows] == [0, 1, 2, 4] and all(r["equal_to_no_swap"] for r in rows)
    tables = [p for p in tmp_path.iterdir() if p.stem == "gpu_checks" and p.suffix != ".json"]  # the Markdown file
    written = tables[0].read_text()
    assert "FAILED: RuntimeError: kernel missing" in written and "bit-equal to no swap" in written
