"""The benchmark scripts run on the tiny config and their FLOP formula matches the anchor of docs/wan_qwen.md §5.1."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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