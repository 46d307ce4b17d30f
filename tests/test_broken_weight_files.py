"""Broken or foreign weight and config files: one BerniniError that names the file (issue 9, item 3).

Every case breaks one file of a tiny checkpoint in an official layout (a truncated shard, a corrupted header, a
pickle renamed .safetensors, a shard lacking a tensor its index lists, a config value of the wrong JSON type, an
empty tokenizer folder) and loads it through the public loader: the load must end in a BerniniError whose
message names the broken file (and, for configs, the key), never in a traceback from safetensors, json or
transformers. A failed download must leave nothing that reads as an incomplete model folder.

The tiny checkpoints are session fixtures; each test links their files into tmp_path and copies only the file it
breaks, so the fixtures stay intact and the file stays fast.
"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from bernini_core.errors import BerniniError

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_extra(tmp_path_factory):
    """The split release (bernini_renderer_high/low + its Wan2.2 base) and ComfyUI single files."""
    from bernini_core.tiny import make_tiny_comfy_files, make_tiny_split

    root = tmp_path_factory.mktemp("broken_extra")
    return {"split": make_tiny_split(root / "Bernini-R", seed=0),
            "comfy": make_tiny_comfy_files(root / "comfy", seed=0)["high"].parent}


@pytest.fixture
def sources(tiny_renderer_dir, tiny_bernini_v1_dir, tiny_extra):
    return {"R": tiny_renderer_dir, "F": tiny_bernini_v1_dir, "split": tiny_extra["split"],
            "comfy": tiny_extra["comfy"], "umt5": tiny_renderer_dir}


def linked_copy(source: Path, target: Path) -> Path:
    """``target`` with every file of ``source`` linked in (copied where links are not allowed)."""
    for file in sorted(source.rglob("*")):
        if file.is_file():
            out = target / file.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.symlink_to(file)
            except OSError:
                shutil.copyfile(file, out)
    return target


def own(path: Path) -> Path:
    """Replace a linked file by a private copy, so that breaking it leaves the session fixture intact."""
    real = path.resolve()
    path.unlink()
    shutil.copyfile(real, path)
    return path


# What each layout is loaded with; `root` is the linked copy (named like the official folder).
def load(kind: str, root: Path):
    from bernini_core.loaders import load_dit_file, load_renderer, load_vae
    from bernini_core.loaders_full import load_full
    from bernini_core.text_encoder import UMT5TextEncoder
    from bernini_core.tiny import TINY_DIT, TINY_VAE, WAN_BASE_DIRNAME
    from bernini_core.vae import VAEConfig

    if kind == "R":
        return load_renderer(root, dtype=torch.float32)
    if kind == "F":
        return load_full(root, dtype=torch.float32)
    if kind == "split":
        return load_renderer(root / WAN_BASE_DIRNAME, high_noise_ckpt=root / "bernini_renderer_high",
                             low_noise_ckpt=root / "bernini_renderer_low", dtype=torch.float32)
    if kind == "comfy":
        head_dim = TINY_DIT["attention_head_dim"]
        load_dit_file(root / "bernini_r_high_noise_tiny_bf16.safetensors", dtype=torch.float32, head_dim=head_dim)
        load_dit_file(root / "bernini_r_low_noise_tiny_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32,
                      head_dim=head_dim)
        return load_vae(root / "wan_2.1_vae_tiny.safetensors", config=VAEConfig.from_dict(TINY_VAE))
    if kind == "umt5":  # the text encoder weights as one file, as ComfyUI keeps them
        return UMT5TextEncoder.from_single_file(root / "text_encoder" / "model.safetensors", dtype=torch.float32,
                                                tokenizer_dir=root / "tokenizer")
    raise AssertionError(kind)


FOLDER_NAMES = {"R": "Bernini-R-Diffusers", "F": "Bernini-Diffusers", "split": "Bernini-R", "comfy": "comfy",
                "umt5": "umt5"}
REPOS = {"R": "ByteDance/Bernini-R-Diffusers", "F": "ByteDance/Bernini-Diffusers"}


def broken_copy(sources, tmp_path, kind):
    return linked_copy(sources[kind], tmp_path / FOLDER_NAMES[kind])


def expect_error(kind: str, root: Path, *named: str) -> str:
    with pytest.raises(BerniniError) as info:
        load(kind, root)
    message = str(info.value)
    for name in named:
        assert name in message, message
    return message


# ----------------------------------------------------------------------------------------------- breaking files
def _split(data: bytes):
    length = int.from_bytes(data[:8], "little")
    return length, data[8:8 + length], data[8 + length:]


def truncate(path: Path) -> None:  # an interrupted download
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(1, len(_split(data)[2]) // 2)])


def garbage(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def invalid_json_header(path: Path) -> None:
    data = path.read_bytes()
    length, _, rest = _split(data)
    path.write_bytes(data[:8] + b'{"' + b"\x00" * (length - 2) + rest)


def absurd_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])


def lying_shape(path: Path) -> None:  # valid JSON, but a shape that does not fit the tensor's bytes
    data = path.read_bytes()
    _, header, rest = _split(data)
    entries = json.loads(header)
    key = next(k for k in sorted(entries) if k != "__metadata__" and entries[k]["shape"])
    entries[key]["shape"] = [2 * entries[key]["shape"][0]] + entries[key]["shape"][1:]
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + rest)


def torch_save(path: Path) -> None:  # a PyTorch checkpoint (zip + pickle) under a .safetensors name
    torch.save({"weight": torch.zeros(4)}, str(path))


def legacy_pickle(path: Path) -> None:  # an old-style pickle checkpoint under a .safetensors name
    path.write_bytes(pickle.dumps({"weight": [0.0] * 4}, protocol=2))


def lfs_pointer(path: Path) -> None:  # a clone without git-lfs leaves these instead of the weights
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


def drop_a_tensor(path: Path) -> None:  # a shard from another download: lacks a tensor its index lists
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop(min(tensors))
    save_file(tensors, str(path))


BREAKS = {"truncated": truncate, "garbage": garbage, "invalid_json_header": invalid_json_header,
          "absurd_header_length": absurd_header_length, "shape_mismatch": lying_shape, "torch_save": torch_save,
          "legacy_pickle": legacy_pickle, "lfs_pointer": lfs_pointer}

# Every safetensors file of every layout: each shard of the sharded checkpoints, and the single files.
WEIGHT_FILES = [
    ("R", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"),
    ("R", "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("R", "transformer_2/diffusion_pytorch_model-00001-of-00002.safetensors"),
    ("R", "transformer_2/diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("R", "text_encoder/model.safetensors"),
    ("R", "vae/diffusion_pytorch_model.safetensors"),
    ("F", "bernini/model-00001-of-00003.safetensors"),
    ("F", "bernini/model-00002-of-00003.safetensors"),
    ("F", "bernini/model-00003-of-00003.safetensors"),
    ("F", "t5_text_encoder/model.safetensors"),
    ("F", "vae/diffusion_pytorch_model.safetensors"),
    ("split", "bernini_renderer_high/model-00001-of-00002.safetensors"),
    ("split", "bernini_renderer_high/model-00002-of-00002.safetensors"),
    ("split", "bernini_renderer_low/model-00001-of-00002.safetensors"),
    ("split", "bernini_renderer_low/model-00002-of-00002.safetensors"),
    ("split", "Wan2.2-T2V-A14B-Diffusers/text_encoder/model.safetensors"),
    ("split", "Wan2.2-T2V-A14B-Diffusers/vae/diffusion_pytorch_model.safetensors"),
    ("comfy", "bernini_r_high_noise_tiny_bf16.safetensors"),
    ("comfy", "bernini_r_low_noise_tiny_fp8_e4m3fn_scaled.safetensors"),
    ("comfy", "wan_2.1_vae_tiny.safetensors"),
    ("umt5", "text_encoder/model.safetensors"),
]
INDEXED_SHARDS = [(kind, file) for kind, file in WEIGHT_FILES if "-of-0000" in file]


@pytest.mark.parametrize("kind", ["R", "F", "split", "comfy", "umt5"])
def test_unbroken_copies_load(sources, tmp_path, kind):
    """The control: the linked copies load, so every error below comes from the one broken file."""
    load(kind, broken_copy(sources, tmp_path, kind))


@pytest.mark.parametrize("kind, file", WEIGHT_FILES, ids=[f"{k}:{f}" for k, f in WEIGHT_FILES])
@pytest.mark.parametrize("how", list(BREAKS))
def test_broken_weight_file_is_named(sources, tmp_path, kind, file, how):
    root = broken_copy(sources, tmp_path, kind)
    BREAKS[how](own(root / file))
    message = expect_error(kind, root, str(root / file), "re-download")
    if kind in REPOS:  # a file of a known download gets the command that replaces exactly it
        assert f"hf download {REPOS[kind]} {file} --local-dir {root}" in message
    if how in ("torch_save", "legacy_pickle"):
        assert "never unpickles" in message
    if how == "truncated":
        assert "truncated" in message


def test_file_in_the_hugging_face_cache_gets_the_cache_command(tmp_path):
    from bernini_core.checkpoints import TensorSource

    file = tmp_path / "models--ByteDance--Bernini-R-Diffusers" / "snapshots" / "0123abc" / "vae" / "weights.safetensors"
    file.parent.mkdir(parents=True)
    truncate_me = tmp_path / "w.safetensors"
    torch.save({"weight": torch.zeros(4)}, str(truncate_me))
    shutil.move(truncate_me, file)
    with pytest.raises(BerniniError) as info:
        TensorSource.open(file.parent)
    message = str(info.value)
    assert str(file) in message and "hf download ByteDance/Bernini-R-Diffusers vae/weights.safetensors --force-download" \
        in message and "--local-dir" not in message


def test_file_of_an_unknown_download_says_re_download(tmp_path):
    from bernini_core.checkpoints import TensorSource

    file = tmp_path / "my_models" / "wan.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"")
    with pytest.raises(BerniniError, match=r"wan.safetensors' is not a safetensors file: it holds only 0 bytes.*"
                                           r"re-download it \(or copy it again"):
        TensorSource.open(file)


@pytest.mark.parametrize("kind, file", INDEXED_SHARDS, ids=[f"{k}:{f}" for k, f in INDEXED_SHARDS])
def test_shard_missing_a_tensor_its_index_lists(sources, tmp_path, kind, file):
    root = broken_copy(sources, tmp_path, kind)
    drop_a_tensor(own(root / file))
    expect_error(kind, root, str(root / file), "index", "lacks 1 tensor")


@pytest.mark.parametrize("kind", ["R", "F"])
def test_text_encoder_missing_a_tensor(sources, tmp_path, kind):
    """transformers would fill a tensor missing from an unindexed UMT5 file with random values and only log it."""
    root = broken_copy(sources, tmp_path, kind)
    folder = "text_encoder" if kind == "R" else "t5_text_encoder"
    drop_a_tensor(own(root / folder / "model.safetensors"))
    expect_error(kind, root, str(root / folder), "lacks 1 UMT5 tensor")


# ----------------------------------------------------------------------------------------------- configs
def set_json(path: Path, key: str, value) -> None:
    data = json.loads(own(path).read_text())
    section = data
    *parents, leaf = key.split(".")
    for parent in parents:
        section = section[parent]
    section[leaf] = value
    path.write_text(json.dumps(data))


CONFIG_CASES = [
    # strings that Python reads as true / a number: today they pass, or fail far from the file
    ("R", "config.json", "switch_dit_boundary", "0.875"),
    ("R", "config.json", "use_unipc", "false"),
    ("R", "config.json", "skip_transformer_2", "false"),  # would silently drop the low-noise expert
    ("F", "config.json", "switch_dit_boundary", "0.875"),
    ("F", "config.json", "use_unipc", "false"),
    ("split", "Wan2.2-T2V-A14B-Diffusers/transformer/config.json", "num_layers", "2"),
    ("R", "transformer/config.json", "num_layers", "2"),
    ("F", "transformer_config.json", "eps", "1e-6"),
    ("R", "vae/config.json", "z_dim", "16"),
    ("F", "vae/config.json", "base_dim", 8.0),
    ("R", "text_encoder/config.json", "d_model", "32"),
    ("F", "t5_text_encoder/config.json", "d_model", "32"),
    ("F", "mllm/config.json", "text_config.hidden_size", "64"),
    # a vocab_size that does not match the embedding it describes
    ("R", "text_encoder/config.json", "vocab_size", 100),
    ("F", "t5_text_encoder/config.json", "vocab_size", 300),
    ("F", "mllm/config.json", "text_config.vocab_size", 100),
]


@pytest.mark.parametrize("kind, file, key, value", CONFIG_CASES,
                         ids=[f"{k}:{f}:{key}={v!r}" for k, f, key, v in CONFIG_CASES])
def test_config_value_of_the_wrong_type_or_size_is_named(sources, tmp_path, kind, file, key, value):
    root = broken_copy(sources, tmp_path, kind)
    set_json(root / file, key, value)
    message = expect_error(kind, root, str(root / file), f"'{key}'", json.dumps(value))
    assert "correct it in that file" in message


@pytest.mark.parametrize("kind, folder", [("R", "tokenizer"), ("F", "t5_tokenizer"), ("F", "mllm"),
                                          ("split", "Wan2.2-T2V-A14B-Diffusers/tokenizer")])
def test_empty_tokenizer_folder_is_named(sources, tmp_path, kind, folder):
    """transformers 5 builds a tokenizer without a word from a folder without tokenizer files."""
    root = broken_copy(sources, tmp_path, kind)
    for file in (root / folder).iterdir():
        if "token" in file.name or file.name == "special_tokens_map.json":
            file.unlink()
    message = expect_error(kind, root, str(root / folder), "tokenizer")
    if kind in REPOS:
        assert f"hf download {REPOS[kind]} --include '{folder}/*' --local-dir {root}" in message


@pytest.mark.parametrize("kind, file", [("F", "mllm/preprocessor_config.json"), ("F", "mllm/tokenizer_config.json"),
                                        ("R", "tokenizer/tokenizer_config.json")])
def test_tokenizer_folder_json_that_does_not_parse_is_named(sources, tmp_path, kind, file):
    """A truncated JSON file fails before loading, naming the file, not deep inside transformers."""
    root = broken_copy(sources, tmp_path, kind)
    target = root / file
    if not target.exists():
        pytest.skip(f"the tiny checkpoint has no {file}")
    text = target.read_text()
    target.unlink()  # linked copy: replace the file, never edit the shared original
    target.write_text(text[: len(text) // 2])
    expect_error(kind, root, str(target), "not valid JSON")


# ----------------------------------------------------------------------------------------------- downloads
@pytest.fixture
def hub(monkeypatch, tiny_renderer_dir):
    """snapshot_download replaced: ``hub.fail_after`` files are written before it raises (None: never)."""
    import fnmatch

    import huggingface_hub

    class Hub:
        fail_after = None
        local_dirs: list = []  # noqa: RUF012 (reset per test below)

    def snapshot_download(repo_id, *, local_dir=None, allow_patterns=None, **kwargs):
        Hub.local_dirs.append(local_dir)
        files = [p for p in sorted(tiny_renderer_dir.rglob("*")) if p.is_file() and any(
            fnmatch.fnmatch(p.relative_to(tiny_renderer_dir).as_posix(), pattern) for pattern in allow_patterns)]
        for i, file in enumerate(files):
            if Hub.fail_after is not None and i == Hub.fail_after:
                raise OSError("Connection reset by peer")
            out = Path(local_dir) / file.relative_to(tiny_renderer_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    Hub.local_dirs = []
    return Hub


@pytest.mark.parametrize("fail_after", [0, 3, 12])
def test_failed_download_reads_as_not_downloaded_and_resumes(tmp_path, hub, fail_after):
    from bernini_core.download import ensure_official_model, files_needed, missing_files

    name = "Bernini-R-Diffusers"
    target = tmp_path / name
    hub.fail_after = fail_after
    with pytest.raises(BerniniError, match="Connection reset by peer"):
        ensure_official_model(name, tmp_path, allow_download=True)
    assert not target.exists()
    assert missing_files(name, tmp_path) == files_needed(name)
    with pytest.raises(BerniniError) as info:
        ensure_official_model(name, tmp_path)
    assert "is not downloaded" in str(info.value) and "incomplete" not in str(info.value)

    hub.fail_after = None  # the retry downloads into the same staging folder (huggingface_hub resumes there)
    assert ensure_official_model(name, tmp_path, allow_download=True) == target
    assert hub.local_dirs[0] == hub.local_dirs[1] != str(target)
    assert missing_files(name, tmp_path) == [] and not Path(hub.local_dirs[0]).exists()


def test_partial_download_without_an_error_leaves_no_model_folder(tmp_path, monkeypatch):
    import huggingface_hub

    from bernini_core.download import ensure_official_model

    def partial(repo_id, *, local_dir=None, **kwargs):
        (Path(local_dir) / "config.json").write_text("{}")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial)
    with pytest.raises(BerniniError, match="still lacks"):
        ensure_official_model("Bernini-R-Diffusers", tmp_path, allow_download=True)
    assert not (tmp_path / "Bernini-R-Diffusers").exists()


def test_model_listing_skips_an_unfinished_download(tmp_path):
    from bernini_core import comfy_bridge
    from bernini_core.download import staging_folder

    for folder in (tmp_path / "Bernini-R-Diffusers", staging_folder(tmp_path / "Bernini-Diffusers"),
                   tmp_path / "mine" / "Bernini-Diffusers-v2"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    assert comfy_bridge._model_dirs(tmp_path) == ["Bernini-R-Diffusers", "mine/Bernini-Diffusers-v2"]
