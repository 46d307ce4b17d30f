"""download.py: which files each official model / part needs, and when the Hub is (not) contacted.

huggingface_hub.snapshot_download is replaced by a fake that builds the tiny official layout
(bernini_core.tiny / tiny_full) and copies into local_dir only the files allow_patterns select (fnmatch,
as huggingface_hub filters), recording its arguments. A socket guard fails any network connection.
"""

import fnmatch
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bernini_core.checkpoints import Layout, detect_layout
from bernini_core.download import OFFICIAL_MODELS, ensure_official_model, files_needed, missing_files, staging_folder
from bernini_core.errors import BerniniError

FULL = ("Bernini-Diffusers", "Bernini-Diffusers-v2")
ALL_PARTS = [(name, part) for name in FULL for part in ("all", "planner", "renderer")] + \
    [(name, part) for name in ("Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers") for part in ("all", "renderer")]
EXPECTED_LAYOUT = {"Bernini-Diffusers": Layout.BERNINI_FULL, "Bernini-Diffusers-v2": Layout.BERNINI_FULL,
                   "Bernini-R-Diffusers": Layout.RENDERER_DIFFUSERS, "Bernini-R-1.3B-Diffusers": Layout.RENDERER_DIFFUSERS}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every way out to the network raises and is recorded; the test then also fails on any attempt."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """What each Hub repository holds, as tiny layouts (plus a README every repo has)."""
    from bernini_core.tiny import make_tiny_renderer
    from bernini_core.tiny_full import make_tiny_bernini

    base = tmp_path_factory.mktemp("hub")
    made = {"Bernini-R-Diffusers": make_tiny_renderer(base / "Bernini-R-Diffusers"),
            "Bernini-R-1.3B-Diffusers": make_tiny_renderer(base / "Bernini-R-1.3B-Diffusers", variant="1.3b"),
            "Bernini-Diffusers": make_tiny_bernini(base / "Bernini-Diffusers", version="v1"),
            "Bernini-Diffusers-v2": make_tiny_bernini(base / "Bernini-Diffusers-v2", version="v2")}
    for folder in made.values():
        (folder / "README.md").write_text("model card\n")
        (folder / "assets").mkdir(exist_ok=True)
        (folder / "assets" / "teaser.mp4").write_bytes(b"\0" * 16)
    return {OFFICIAL_MODELS[name]: folder for name, folder in made.items()}


@pytest.fixture
def fake_hub(monkeypatch, repos):
    """Replace snapshot_download; returns the list of recorded calls (kwargs)."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, *, local_dir=None, allow_patterns=None, tqdm_class=None, **kwargs):
        calls.append(dict(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns,
                          tqdm_class=tqdm_class, **kwargs))
        source = repos[repo_id]
        chosen = [p for p in sorted(source.rglob("*")) if p.is_file() and any(
            fnmatch.fnmatch(p.relative_to(source).as_posix(), pattern) for pattern in allow_patterns or ["*"])]
        bar = tqdm_class(total=len(chosen), desc="Fetching files") if tqdm_class else None
        if tqdm_class:
            tqdm_class(total=1000, unit="B", desc="Downloading bytes").update(500)  # byte bars are not reported
        for file in chosen:
            out = Path(local_dir) / file.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out)
            if bar is not None:
                bar.update(1)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


# --------------------------------------------------------------------------- files_needed

def test_files_needed_per_model_and_part():
    planner = files_needed("Bernini-Diffusers", "planner")
    renderer = files_needed("Bernini-Diffusers", "renderer")
    assert planner == ["config.json", "bernini/*", "mllm/*"]
    assert renderer == ["config.json", "bernini/*", "mllm/*", "transformer*_config.json", "t5_text_encoder/*",
                        "t5_tokenizer/*", "vae/*", "scheduler/*"]
    assert files_needed("Bernini-Diffusers", "all") == renderer  # the renderer list already covers the planner
    assert files_needed("Bernini-Diffusers-v2", "planner") == planner
    r = ["config.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*"]
    assert files_needed("Bernini-R-Diffusers", "all") == files_needed("Bernini-R-Diffusers", "renderer") == r
    for name in OFFICIAL_MODELS:  # no part pulls the planner-only or renderer-only folders of the other family
        joined = " ".join(files_needed(name, "all"))
        two_experts = name not in FULL and "1.3B" not in name  # the 1.3B renderer has one expert (no transformer_2/)
        assert ("t5_text_encoder" in joined) == (name in FULL) and ("transformer_2/*" in joined) == two_experts


def test_files_needed_rejects_bad_requests():
    with pytest.raises(BerniniError, match="no planner"):
        files_needed("Bernini-R-Diffusers", "planner")
    with pytest.raises(BerniniError, match="part must be one of"):
        files_needed("Bernini-Diffusers", "experts")
    with pytest.raises(BerniniError, match="Bernini-Diffusers, Bernini-Diffusers-v2, Bernini-R-Diffusers"):
        files_needed("Bernini-X", "all")


# --------------------------------------------------------------------------- ensure_official_model

@pytest.mark.parametrize("name, part", ALL_PARTS)
def test_download_fetches_only_what_the_part_needs(tmp_path, fake_hub, name, part):
    path = ensure_official_model(name, tmp_path, part=part, allow_download=True)
    assert path == tmp_path / name
    assert len(fake_hub) == 1
    call = fake_hub[0]
    assert call["repo_id"] == OFFICIAL_MODELS[name]
    assert call["local_dir"] == str(staging_folder(tmp_path / name))  # renamed into place once complete
    assert not staging_folder(tmp_path / name).exists()
    assert call["allow_patterns"] == files_needed(name, part)
    assert detect_layout(path) == EXPECTED_LAYOUT[name]
    assert missing_files(name, tmp_path, part) == []
    assert not (path / "README.md").exists() and not (path / "assets").exists()
    if part == "planner":
        assert not (path / "vae").exists() and not (path / "t5_text_encoder").exists()
        assert (path / "mllm").is_dir() and any((path / "bernini").glob("*.safetensors"))
    # A second request finds the folder complete and does not call the Hub again.
    assert ensure_official_model(name, tmp_path, part=part, allow_download=True) == path
    assert len(fake_hub) == 1


@pytest.mark.parametrize("name", list(OFFICIAL_MODELS))
def test_existing_complete_folder_is_used_as_is(tmp_path, fake_hub, repos, name):
    shutil.copytree(repos[OFFICIAL_MODELS[name]], tmp_path / name)
    assert ensure_official_model(name, tmp_path) == tmp_path / name
    assert ensure_official_model(name, tmp_path, allow_download=True) == tmp_path / name
    assert fake_hub == []


def test_without_allow_download_the_error_gives_the_command(tmp_path, fake_hub):
    with pytest.raises(BerniniError) as info:
        ensure_official_model("Bernini-R-Diffusers", tmp_path)
    message = str(info.value)
    assert f"hf download ByteDance/Bernini-R-Diffusers --local-dir {tmp_path / 'Bernini-R-Diffusers'}" in message
    assert '"if missing"' in message and "not downloaded" in message
    assert fake_hub == [] and not (tmp_path / "Bernini-R-Diffusers").exists()


def test_planner_download_then_renderer_part(tmp_path, fake_hub):
    """A folder holding only the planner part is incomplete for the renderer: error, or a second fetch."""
    name = "Bernini-Diffusers-v2"
    ensure_official_model(name, tmp_path, part="planner", allow_download=True)
    with pytest.raises(BerniniError, match=r"incomplete \(missing: transformer\*_config.json, t5_text_encoder/\*"):
        ensure_official_model(name, tmp_path, part="renderer")
    ensure_official_model(name, tmp_path, part="renderer", allow_download=True)
    assert [call["allow_patterns"] for call in fake_hub] == [files_needed(name, "planner"),
                                                             files_needed(name, "renderer")]
    assert missing_files(name, tmp_path, "all") == []


def test_missing_shard_makes_the_folder_incomplete(tmp_path, repos, fake_hub):
    name = "Bernini-R-Diffusers"
    shutil.copytree(repos[OFFICIAL_MODELS[name]], tmp_path / name)
    shard = sorted((tmp_path / name / "transformer_2").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(BerniniError, match=f"transformer_2/{shard.name}"):
        ensure_official_model(name, tmp_path)
    ensure_official_model(name, tmp_path, allow_download=True)
    assert shard.is_file() and len(fake_hub) == 1


def test_unknown_name_lists_the_official_names(tmp_path, fake_hub):
    with pytest.raises(BerniniError, match="Bernini-Diffusers, Bernini-Diffusers-v2, Bernini-R-Diffusers"):
        ensure_official_model("Bernini-R-14B", tmp_path, allow_download=True)
    assert fake_hub == []


def test_progress_reports_files(tmp_path, fake_hub):
    seen = []
    ensure_official_model("Bernini-R-Diffusers", tmp_path, allow_download=True,
                          progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert total == sum(1 for p in (tmp_path / "Bernini-R-Diffusers").rglob("*") if p.is_file()
                        and ".cache" not in p.parts)
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_progress_as_an_advance_callback(tmp_path, fake_hub):
    """A one-argument callback (ComfyUI ProgressBar.update style) gets the files completed per update."""
    steps = []
    ensure_official_model("Bernini-R-Diffusers", tmp_path, allow_download=True, progress=lambda n=1: steps.append(n))
    files = sum(1 for p in (tmp_path / "Bernini-R-Diffusers").rglob("*") if p.is_file())
    assert steps == [1] * files


def test_failed_or_partial_download_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def broken(repo_id, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(BerniniError, match="No space left on device.*hf download ByteDance/Bernini-Diffusers"):
        ensure_official_model("Bernini-Diffusers", tmp_path, allow_download=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: kwargs["local_dir"])
    with pytest.raises(BerniniError, match="still lacks"):
        ensure_official_model("Bernini-Diffusers", tmp_path, allow_download=True)


def test_missing_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(BerniniError, match="pip install huggingface_hub"):
        ensure_official_model("Bernini-R-Diffusers", tmp_path, allow_download=True)


def test_module_imports_without_huggingface_hub():
    code = ("import sys; sys.modules['huggingface_hub'] = None; import bernini_core.download as d; "
            "print(d.files_needed('Bernini-Diffusers', 'planner'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bernini/*" in out.stdout
