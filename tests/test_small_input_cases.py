"""Small input cases that used to go wrong quietly: empty batches, unreadable case files, which of two same-named
media files a case file means, long output names, and the planner processor never reaching for the network."""

import json

import numpy as np
import pytest

from bernini_core import media
from bernini_core.cli import _relative_to, main


def run_cli(config, *extra):
    return main(["generate", "--config", str(config), "--device", "cpu", *extra])


def test_an_empty_batch_is_nothing_to_do(tiny_renderer_dir, tmp_path, capsys):
    batch = tmp_path / "batch.json"
    batch.write_text("[]")
    assert run_cli(tiny_renderer_dir, "--inputs", str(batch)) == 2
    assert "holds no entries: nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("kind, fragment", [("folder", "is a folder, not a JSON file"),
                                            ("latin1", "is not UTF-8 text; save it as UTF-8 JSON")])
@pytest.mark.parametrize("flag", ["--case", "--inputs"])
def test_unreadable_case_and_batch_files(tiny_renderer_dir, tmp_path, capsys, flag, kind, fragment):
    path = tmp_path / "case.json"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    assert run_cli(tiny_renderer_dir, flag, str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and str(path) in err and "Traceback" not in err


def test_case_file_media_resolve_beside_the_case_file_first(tmp_path, monkeypatch):
    cwd, cases = tmp_path / "cwd", tmp_path / "cases"
    for folder in (cwd, cases):
        folder.mkdir()
        (folder / "clip.mp4").write_bytes(b"x")
    monkeypatch.chdir(cwd)
    assert _relative_to(cases, "clip.mp4") == str(cases / "clip.mp4")  # the case file's own clip wins
    (cases / "clip.mp4").unlink()
    assert _relative_to(cases, "clip.mp4") == "clip.mp4"  # else the working directory's
    assert _relative_to(cases, "missing.mp4") == "missing.mp4"  # as written; the error says where it was looked for
    assert _relative_to(cases, str(cwd / "clip.mp4")) == str(cwd / "clip.mp4")


def test_a_legal_254_character_name_is_written(tmp_path):
    name = "v" * 250 + ".png"
    assert len(name) == 254
    written = media.save_output(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / name, fps=16)
    assert written.name == name and written.is_file()


def test_the_planner_processor_is_read_from_the_folder_only(tmp_path, monkeypatch):
    from transformers import AutoProcessor

    from bernini_core.planner import vision

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    seen = {}
    monkeypatch.setattr(vision, "_torchvision_available", lambda: True)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", classmethod(lambda cls, path, **kw: seen.update(kw)))
    vision.load_vit_processor(tmp_path)
    assert seen.get("local_files_only") is True


def test_a_folder_given_as_a_media_file_is_called_a_folder(tmp_path):
    from bernini_core import BerniniError
    from bernini_core.planner.vision import open_image_for_vit

    with pytest.raises(BerniniError, match="is a folder, not a video file"):
        media.read_video(tmp_path)
    with pytest.raises(BerniniError, match="is a folder, not an image file"):
        open_image_for_vit(tmp_path)


def test_decode_given_a_bare_tensor_says_what_it_expected():
    import torch

    from bernini_core import BerniniError, node_api

    with pytest.raises(BerniniError, match=r"samples must be a LATENT, i.e. \{'samples': tensor .*got Tensor"):
        node_api.decode(None, torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(BerniniError, match=r"got a dict with keys \['latent'\]"):
        node_api.decode(None, {"latent": torch.zeros(1, 16, 2, 4, 4)})


@pytest.mark.parametrize("family, label, mode, fragment", [
    ("bernini_renderer", "Bernini-R", "vae_txt_vit_wapg", "is a full-Bernini mode but the renderer is Bernini-R"),
    ("bernini_renderer", "Bernini-R", "bogus", "is not a guidance mode of Bernini-R"),
    ("bernini", "Bernini v2", "bogus", "is not a guidance mode of Bernini v2"),
])
def test_a_bad_node_guidance_mode_is_named_for_what_it_is(family, label, mode, fragment):
    from types import SimpleNamespace

    from bernini_core import BerniniError, node_api

    renderer = SimpleNamespace(family=family, label=label)
    with pytest.raises(BerniniError, match=fragment):
        node_api._guidance_mode(renderer, mode, {"guidance_mode": "t2v"})
