"""Whole multi-process runs on the CPU (gloo): torchrun and `generate --gpus N` worlds equal the one-process run
of the same inputs and seed (fp32, final latents within 1e-5 relative), data-parallel batches split the work,
two "nodes" meet through torchrun's rendezvous on localhost, and a rank that dies or hangs stops the run with a
message naming it, leaving no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bernini_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--device", "cpu", "--dtype", "fp32", "--num_frames", "5", "--num_inference_steps", "3", "--seed", "7"]
TIMEOUT = 300  # a world that takes longer than this is hung: the test fails instead of waiting forever


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_for_ranks() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def torchrun(nproc: int, args: list, *, script=None, extra=(), timeout=TIMEOUT, env=None) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "bernini_core"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", *extra, *target, "generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**env_for_ranks(), **(env or {})})


def latents(path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latents")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def one_process(tmp_path, args: list, name="single") -> torch.Tensor:
    out = tmp_path / name
    out.mkdir()
    assert main(["generate", *args, "--output", str(out / "out.mp4"), "--save_latents",
                 str(out / "lat.safetensors"), "--quiet"]) == 0
    return latents(out / "lat.safetensors")


def check_world(result: subprocess.CompletedProcess, out: Path, reference: torch.Tensor) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line for line in result.stdout.splitlines() if line.strip()]
    assert written == [str(out / "out.mp4"), str(out / "lat.safetensors")], result.stdout  # the leader only
    assert relative(latents(out / "lat.safetensors"), reference) <= 1e-5


RENDERER_T2V = ["--config", "tiny", "--task_type", "t2v", "--prompt", "a red fox", "--height", "32", "--width", "48",
                *SMALL]


@pytest.mark.parametrize("weights", [[], ["--fsdp"]], ids=["replicated", "fsdp"])
def test_renderer_t2v_ulysses_2_equals_one_process(tmp_path, weights):
    reference = one_process(tmp_path, RENDERER_T2V)
    out = tmp_path / "world"
    result = torchrun(2, [*RENDERER_T2V, "--ulysses", "2", *weights, "--output", str(out / "out.mp4"),
                          "--save_latents", str(out / "lat.safetensors")])
    check_world(result, out, reference)


def test_renderer_rv2v_ulysses_2_cfg_2_with_uneven_streams(tmp_path, media_dir):
    # a reference image of another aspect ratio than the video: stream lengths differ, the sequence needs padding
    args = ["--config", "tiny", "--task_type", "rv2v", "--prompt", "make it snow", "--video",
            str(media_dir / "source.mp4"), "--images", str(media_dir / "ref1.png"), "--max_image_size", "48", *SMALL]
    reference = one_process(tmp_path, args)
    out = tmp_path / "world"
    result = torchrun(4, [*args, "--ulysses", "2", "--cfg_parallel", "2", "--output", str(out / "out.mp4"),
                          "--save_latents", str(out / "lat.safetensors")])
    check_world(result, out, reference)


FULL_V2V = ["--config", "tiny-full", "--task_type", "v2v", "--prompt", "make it snow", "--max_image_size", "48",
            "--planning_step", "3", *SMALL]


def test_full_bernini_v2v_ulysses_2_via_gpus_flag(tmp_path, media_dir):
    """The planner runs on the leader only; the plan reaches the other rank by broadcast. Started with
    `--gpus 2 --device cpu` (the launcher built in), not torchrun."""
    args = [*FULL_V2V, "--video", str(media_dir / "source.mp4")]
    reference = one_process(tmp_path, args)
    out = tmp_path / "world"
    cmd = [sys.executable, "-m", "bernini_core", "generate", *args, "--gpus", "2", "--ulysses", "2",
           "--output", str(out / "out.mp4"), "--save_latents", str(out / "lat.safetensors")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env_for_ranks())
    check_world(result, out, reference)


def test_full_bernini_v2v_ulysses_2_cfg_2_under_torchrun(tmp_path, media_dir):
    """vae_txt_vit_wapg's four passes a step dealt to two Ulysses groups of two."""
    args = [*FULL_V2V, "--video", str(media_dir / "source.mp4")]
    reference = one_process(tmp_path, args)
    out = tmp_path / "world"
    result = torchrun(4, [*args, "--ulysses", "2", "--cfg_parallel", "2", "--output", str(out / "out.mp4"),
                          "--save_latents", str(out / "lat.safetensors")])
    check_world(result, out, reference)


def test_data_parallel_batch_of_three_on_two_ranks(tmp_path):
    entries = [{"task_type": "t2v", "prompt": p} for p in ("a red fox", "a blue bird", "a green frog")]
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps(entries))
    base = ["--config", "tiny", "--height", "32", "--width", "32", "--inputs", str(batch), *SMALL]
    single = tmp_path / "single"
    assert main(["generate", *base, "--output", str(single / "out.mp4"), "--save_latents",
                 str(single / "lat.safetensors"), "--quiet"]) == 0
    world = tmp_path / "world"
    result = torchrun(2, [*base, "--output", str(world / "out.mp4"), "--save_latents", str(world / "lat.safetensors")])
    assert result.returncode == 0, result.stderr[-3000:]
    for index in range(3):  # each entry written once, by the rank it was dealt to (tasks[dp_rank::dp_size])
        name = f"lat_{index:03d}.safetensors"
        assert relative(latents(world / name), latents(single / name)) <= 1e-5
        assert (world / f"out_{index:03d}.mp4").is_file()
    assert sorted(p.name for p in world.iterdir()) == sorted(p.name for p in single.iterdir())


def test_two_nodes_meet_through_the_rendezvous(tmp_path):
    reference = one_process(tmp_path, RENDERER_T2V)
    out = tmp_path / "world"
    port = free_port()
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bernini-test",
               "--max-restarts", "0", "-m", "bernini_core", "generate", *RENDERER_T2V, "--ulysses", "2",
               "--output", str(out / "out.mp4"), "--save_latents", str(out / "lat.safetensors")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=env_for_ranks()))
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert relative(latents(out / "lat.safetensors"), reference) <= 1e-5
    assert sum(line.strip() == str(out / "out.mp4") for o, _ in outputs for line in o.splitlines()) == 1


FAULT_DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_run(tmp_path, fault):
    out = tmp_path / "world"
    start = time.monotonic()
    result = torchrun(2, [*RENDERER_T2V, "--ulysses", "2", "--parallel_timeout", "20", "--output",
                          str(out / "out.mp4"), "--save_latents", str(out / "lat.safetensors")],
                      script=FAULT_DRIVER, timeout=240, env={"BERNINI_TEST_FAULT": fault})
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 200, f"the run took {elapsed:.0f} s to stop"
    assert not out.exists() or not any(out.iterdir()), "a failed run wrote output"
    text = result.stderr
    if fault == "exit":
        assert "exitcode" in text and "17" in text, text[-3000:]  # torchrun names the rank that failed, and how
    else:
        assert "rank 0" in text and "timed out" in text.lower(), text[-3000:]
