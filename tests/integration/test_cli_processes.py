"""Whole processes: the CLI through `python -m bernini_core` (its exit code, the files it writes, its log as a user
reads it) and the parallel benchmark's quick run. Moved here from the unit suite: each starts a fresh interpreter
(several seconds of imports), which the unit suite's time budget cannot carry."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from written_media import probe

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num_frames", "5", "--height", "32", "--width", "32", "--max_image_size", "48",
         "--num_inference_steps", "2", "--device", "cpu"]
SMALL_NO_SIZE = ["--num_frames", "5", "--max_image_size", "48", "--num_inference_steps", "2", "--device", "cpu"]
FAST_PLAN = ["--planning_step", "2", "--vit_denoising_step", "1"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_tiny_config_through_python_dash_m(tmp_path):
    out = tmp_path / "tiny.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "bernini_core", "generate", "--config", "tiny", "--task_type", "t2v",
         "--prompt", "a fox", "--output", str(out), *SMALL],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert probe(out) == (5, 32, 32, 16.0)


def test_tiny_full_v2_through_python_dash_m(tmp_path):
    out = tmp_path / "tiny_v2.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "bernini_core", "generate", "--config", "tiny-full-v2", "--task_type", "t2v",
         "--prompt", "a fox", "--output", str(out), "--height", "32", "--width", "32", *SMALL_NO_SIZE, *FAST_PLAN],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert probe(out) == (5, 32, 32, 16.0)
    assert "full Bernini v2" in result.stderr  # the loader says which release it read
    # the log reads well: no transformers progress bar, no doubled words, the layout's own folder name
    for bad in ("Loading weights", "Loading checkpoint shards", "it/s]", "tiny random tiny", "(default (", "Traceback"):
        assert bad not in result.stderr, result.stderr
    assert "--config tiny-full-v2: tiny random checkpoint in the Bernini-Diffusers-v2 layout" in result.stderr


@pytest.mark.parametrize("config", ["tiny", "tiny-1.3b"])
def test_tiny_run_log_reads_well(tmp_path, config):
    out = tmp_path / "tiny.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "bernini_core", "generate", "--config", config, "--task_type", "t2v",
         "--prompt", "a red fox", "--output", str(out), *SMALL],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log_text = result.stderr
    for bad in ("Loading weights", "Loading checkpoint shards", "it/s]", "tiny random tiny", "Traceback",
                "WARNING", "Warning"):
        assert bad not in log_text, log_text
    # the stage bars (tests/test_progress.py) redraw with carriage returns; the log lines are the rest
    lines = [line for line in log_text.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    folder = "Bernini-R-1.3B-Diffusers" if config == "tiny-1.3b" else "Bernini-R-Diffusers"
    assert len(lines) == 2, log_text  # what was written, what was saved
    assert f"--config {config}: tiny random checkpoint in the {folder} layout written to" in lines[0]
    assert lines[0].rstrip().endswith(f"{folder} (its output is noise by design)")
    assert lines[1].endswith(f"saved {out} (5 frames, 32x32)")


def test_parallel_benchmark_quick_run_prints_its_tables():
    """--quick: one gloo world of 2 runs the tiny denoise alone, with U2 and with C2; the instrumented bytes of every
    collective equal the formula, both layouts end on the one-process latents, and the A14B model prints."""
    bench = load("parallel")
    # docs/wan_qwen.md §5.1: one rank's share of a forward sums to the whole at U=1; 480p a2a per layer at U=8:
    # 4 tensors x 32,760 x 5120 x 2 bytes x 7/64.
    assert bench.rank_forward_flops(bench.A14B, 32760, 512, 1) == bench.forward_flops(bench.A14B, 32760, 512)
    assert bench.a2a_layer_bytes(32760, 5120, 8, 2) == 4 * 32760 * 5120 * 2 * 7 / 64

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel.py"), "--quick", "--ray"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    for text in ("| time per step", "| speed-up", "| efficiency", "| received / rank", "| formula bytes",
                 "a2a q/k/v (per step)", "a2a output (per step)", "all-gather output (per step)",
                 "arm broadcast (per step)", "start check (per run)", "## Arithmetic model", "| U4xC2",
                 "| U2xC4", "### Anchors", "34.8 s/step"):
        assert text in out, text
    assert "instrumented bytes equal the formula for every collective" in out
    # the ComfyUI/Ray rows: each multi-process layout through a Bernini Multi-GPU pool, with its numbers
    ray_table = out[out.index("## ComfyUI/Ray"):].splitlines()
    assert [line.split("|")[1].strip() for line in ray_table if line.startswith("| U") or line.startswith("| C")] == [
        "U2", "C2"]
    assert all(" ms" in line for line in ray_table if line.startswith(("| U", "| C")))
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "| max rel. diff vs 1" in line)
    layouts = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        layouts[cells[0]] = float(cells[-1])
    assert set(layouts) == {"1", "U2", "C2"} and max(layouts.values()) <= 1e-5, layouts
