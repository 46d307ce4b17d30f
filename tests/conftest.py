"""Session fixtures shared by the end-to-end tests: tiny checkpoints and small media files."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # test helpers (written_media, workflow_tools)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_renderer_dir(tmp_path_factory):
    from bernini_core.tiny import make_tiny_renderer

    return make_tiny_renderer(tmp_path_factory.mktemp("tiny") / "Bernini-R-Diffusers", seed=0)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """A 17-frame 24 fps 48x40 MP4 (moving gradient), a second 9-frame clip, and two PNG references."""
    import av
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)

    def write_video(path, frames, fps, h, w):
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
            for i in range(frames):
                y, x = np.mgrid[0:h, 0:w]
                img = np.stack([(x * 5 + i * 9) % 256, (y * 6) % 256, np.full_like(x, 40 + 8 * i)], -1).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    write_video(root / "source.mp4", 17, 24, 40, 48)
    write_video(root / "reference.mp4", 9, 16, 32, 32)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "ref0.png")
    Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(root / "ref1.png")
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(root / "tiny4x4.png")
    return root


@pytest.fixture(scope="session")
def tiny_bernini_v1_dir(tmp_path_factory):
    """A tiny random Bernini-Diffusers (v1) folder in the official layout."""
    from bernini_core.tiny_full import make_tiny_bernini

    return make_tiny_bernini(tmp_path_factory.mktemp("tiny_full") / "Bernini-Diffusers", version="v1", seed=0)


@pytest.fixture(scope="session")
def tiny_bernini_v2_dir(tmp_path_factory):
    """A tiny random Bernini-Diffusers-v2 folder (the folder name is how v2 is told from v1)."""
    from bernini_core.tiny_full import make_tiny_bernini

    return make_tiny_bernini(tmp_path_factory.mktemp("tiny_full_v2") / "Bernini-Diffusers-v2", version="v2", seed=0)


@pytest.fixture(scope="session")
def fp32_renderer(tiny_renderer_dir):
    """The tiny Bernini-R pipeline in fp32 on the CPU, shared by the input-checking tests."""
    from bernini_core import BerniniPipeline

    return BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")


@pytest.fixture
def no_work(fp32_renderer, monkeypatch):
    """Records any stage of `fp32_renderer` that starts: a test passes only if its error comes before the first."""
    calls = []
    for stage in ("encode_prompt", "prepare_sources", "sample"):
        monkeypatch.setattr(fp32_renderer, stage, lambda *a, _s=stage, **k: calls.append(_s))
    return calls


@pytest.fixture
def comfy(tmp_path):
    """The ComfyUI stand-in of tests/comfy_stub.py in sys.modules for one test (other tests assert ComfyUI is absent):
    its modules, the Recorder of what the bridge did, the models folder and comfy.model_management."""
    import types

    import comfy_stub

    modules, rec = comfy_stub.build(tmp_path / "models")
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(rec=rec, modules=modules, models=tmp_path / "models",
                                    mm=modules["comfy.model_management"])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
