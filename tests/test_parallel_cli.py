"""The multi-process flags are checked before anything loads or starts, and the pieces of a run that need no
second process: the rank's device, the launcher's failure report, the latents file."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from bernini_core import BerniniError, media
from bernini_core.cli import main
from bernini_core.parallel.launch import describe_failures, distributed_env, rank_device
from bernini_core.pipeline import BerniniPipeline

BASE = ["--prompt", "a fox", "--task_type", "t2v", "--height", "32", "--width", "32", "--device", "cpu"]


@pytest.fixture
def nothing_starts(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model loaded or a process started before the flags were checked")

    monkeypatch.setattr(BerniniPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("bernini_core.parallel.launch.launch_local", refuse)
    monkeypatch.setattr("bernini_core.tiny.make_tiny_renderer", refuse)
    return calls


@pytest.fixture
def forty_heads(tiny_renderer_dir, tmp_path):
    """The tiny renderer folder with the A14B head count in its transformer config (no weights are read)."""
    folder = tmp_path / "a14b_heads"
    shutil.copytree(tiny_renderer_dir, folder, symlinks=True)
    for name in ("transformer", "transformer_2"):
        path = folder / name / "config.json"
        if path.is_file():
            config = json.loads(path.read_text())
            path.unlink()  # the copy may share the file with the session fixture: replace, never edit in place
            path.write_text(json.dumps(dict(config, num_attention_heads=40)))
    return folder


@pytest.mark.parametrize("extra, fragments", [
    (["--gpus", "3", "--ulysses", "3"], ("ulysses=3 does not divide", "40", "1, 2, 4, 5, 8, 10, 20, 40")),
    (["--gpus", "3", "--ulysses", "2"], ("3 process(es) cannot be split", "--ulysses 2")),
    (["--gpus", "4", "--ulysses", "2", "--cfg_parallel", "3"], ("cannot be split", "= 6")),
    (["--ulysses", "2"], ("need 2 processes", "--gpus 2")),
    (["--gpus", "0"], ("--gpus 0", "at least 1")),
    (["--gpus", "2", "--parallel_timeout", "0"], ("--parallel_timeout", "positive")),
    (["--gpus", "2", "--save_latents", "lat.pt"], ("--save_latents", ".safetensors")),
])
def test_multi_process_flags_are_checked_before_anything_starts(forty_heads, nothing_starts, capsys, extra,
                                                                fragments):
    assert main(["generate", "--config", str(forty_heads), *BASE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and all(f in err for f in fragments), err
    assert nothing_starts == []


def test_more_gpus_than_the_machine_has_is_refused(tiny_renderer_dir, monkeypatch, capsys):
    from bernini_core.parallel import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BerniniError, match="asks for 2 GPUs but this machine has 0; use --device cpu"):
        launch.launch_local(2, [], device="auto", timeout_s=60)


def test_the_tiny_checkpoint_heads_are_known_before_it_is_written(nothing_starts, capsys):
    assert main(["generate", "--config", "tiny", *BASE, "--gpus", "4", "--ulysses", "4"]) == 2
    assert "ulysses=4 does not divide the DiT's 2 attention heads" in capsys.readouterr().err


def test_a_process_alone_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(BerniniError, match="not whole numbers"):
        distributed_env()


def test_rank_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("cpu", 3) == torch.device("cpu")
    assert rank_device("auto", 1) == torch.device("cpu")
    with pytest.raises(BerniniError, match="CUDA is not available"):
        rank_device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto", 1) == torch.device("cuda", 1)
    with pytest.raises(BerniniError, match="local rank 2 needs GPU cuda:2 but this node has 2"):
        rank_device("auto", 2)


def test_the_launcher_names_the_failed_rank():
    failure = SimpleNamespace(exitcode=17, error_file=None, message="")
    killed = SimpleNamespace(exitcode=-9, error_file=None, message="")
    text = describe_failures(SimpleNamespace(failures={1: failure, 0: killed}))
    assert "rank 0 was killed by signal 9" in text and "rank 1 exited with code 17" in text


def test_latents_file_holds_the_settings_and_never_replaces_a_file(tmp_path):
    raw = torch.randn(1, 16, 2, 4, 6)
    path = tmp_path / "lat.safetensors"
    path.write_bytes(b"the user's file")
    written = media.save_latents(raw, path, {"seed": 7, "guidance_mode": "t2v_apg"})
    assert path.read_bytes() == b"the user's file" and written.name == "lat_00001.safetensors"
    with safe_open(str(written), "pt") as f:
        assert torch.equal(f.get_tensor("latents"), raw)
        assert json.loads(f.metadata()["bernini_settings"])["seed"] == 7
    with pytest.raises(BerniniError, match="must end in .safetensors"):
        media.save_latents(raw, tmp_path / "lat.pt", {})
