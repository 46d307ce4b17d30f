"""Planner vision preprocessing (bernini_core.planner.vision): Qwen grids and ViT frame counts of
docs/official_behaviour.md §3.2 / §7.2 against transformers' processor on the tiny assets, the pure-torch processor
(layout transcription; equality with the torchvision-backed processor where installed), and
the target placeholder rules."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bernini_core.errors import BerniniError  # noqa: E402
from bernini_core.planner import vision  # noqa: E402
from bernini_core.planner.template import VisualItem  # noqa: E402
from bernini_core.planner.tiny_mllm import write_tiny_mllm_assets  # noqa: E402
from bernini_core.planner.vision import (  # noqa: E402
    TorchVitProcessor,
    image_grid,
    load_vit_processor,
    preprocess_image_for_vit,
    preprocess_video_for_vit,
    target_item,
    video_grid,
    video_vit_frame_count,
    video_vit_frame_indices,
    vit_fps,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor  # noqa: E402

try:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
except ImportError:  # transformers 4.x
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

try:
    import torchvision  # noqa: F401

    HAS_TORCHVISION = True
except Exception:
    HAS_TORCHVISION = False
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' torch processors need torchvision")

SIZE_EXAMPLES = {(480, 848): (1, 12, 20), (480, 832): (1, 12, 20), (720, 1280): (1, 12, 20),
                 (1080, 1920): (1, 12, 20), (512, 512): (1, 16, 16)}  # docs/official_behaviour.md §3.2 [computed]


@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory):
    return write_tiny_mllm_assets(tmp_path_factory.mktemp("tiny") / "mllm")


@pytest.fixture(scope="module")
def image_processor(mllm_dir):
    """transformers' image processor of the tiny assets (the PIL backend where torchvision is missing)."""
    return AutoImageProcessor.from_pretrained(str(mllm_dir))


@pytest.fixture(scope="module")
def torch_processor(mllm_dir):
    return TorchVitProcessor.from_folder(mllm_dir)


def black(h, w):
    return np.zeros((h, w, 3), np.uint8)


# --------------------------------------------------------------------------- grids

def test_vit_fps():
    assert [vit_fps(f) for f in (16, 24, 30, 8, 7, 16.0)] == [2, 3, 3, 1, 0, 2]


def test_smart_resize_matches_transformers():
    sizes = [(480, 848), (512, 512), (1080, 1920), (37, 41), (28, 28), (10, 2000), (4000, 3000), (42, 70), (98, 28),
             (239, 427), (100, 200), (600, 14), (57, 57), (223, 225)]
    for h, w in sizes:
        expected = hf_smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=50176)
        assert vision.smart_resize(h, w) == tuple(expected), (h, w)
        assert image_grid(h, w) == (1, expected[0] // 14, expected[1] // 14)
    with pytest.raises(BerniniError, match="aspect ratio"):
        image_grid(2, 500)


def test_image_grids_of_the_spec_examples_against_the_processor(image_processor):
    for (h, w), grid in SIZE_EXAMPLES.items():
        assert image_grid(h, w) == grid
        pixels, processed_grid = preprocess_image_for_vit(image_processor, black(h, w))
        assert processed_grid == grid
        assert pixels.shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
        assert VisualItem("image", grid).n_tokens == grid[1] * grid[2] // 4
    assert VisualItem("image", image_grid(480, 848)).n_tokens == 60
    assert VisualItem("image", image_grid(512, 512)).n_tokens == 64


def test_video_frame_counts():
    assert video_vit_frame_count(81, 16, 16, 81) == 10  # docs/official_behaviour.md §3.2: 81 f → 10 frames → grid_t 5
    assert video_grid(10, 480, 848) == (5, 12, 20)
    assert VisualItem("video", video_grid(10, 480, 848)).n_tokens == 300
    # 121 f @ 24 fps at fps 24: ViT 3 fps → 15.1 → 14 (even); the cap is num_frames // 2 * 2.
    assert video_vit_frame_count(121, 24, 24, 121) == 14
    assert video_vit_frame_count(400, 16, 16, 9) == 8
    assert video_vit_frame_count(300, 30, 16, 81) == 20  # 10 s of a 30 fps clip at 2 fps
    # Very short clips and fps < 8 (vit fps 0) still give 2 frames.
    assert video_vit_frame_count(5, 30, 16, 81) == 2
    assert video_vit_frame_count(81, 6, 6, 81) == 2
    assert video_grid(9, 480, 848) == (5, 12, 20)  # an odd count is padded to a full temporal patch


def test_video_frame_indices():
    # 81 frames at 16 fps seen at 2 fps: 10 frames spread over the clip (round half to even).
    assert video_vit_frame_indices(81, 16, 16, 81) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    # A long clip capped by num_frames keeps its beginning at the ViT rate.
    assert video_vit_frame_indices(160, 16, 16, 9) == [0, 8, 17, 25, 33, 42, 50, 59]  # linspace(0, 159, 20)[:8]


@needs_torchvision
def test_video_grid_against_the_processor(mllm_dir):
    processor = load_vit_processor(mllm_dir)
    assert not isinstance(processor, TorchVitProcessor)
    pixels, grid = preprocess_video_for_vit(processor, np.zeros((10, 480, 848, 3), np.uint8))
    assert grid == (5, 12, 20) and pixels.shape == (5 * 12 * 20, 1176)


# --------------------------------------------------------------------------- pixels

def test_torch_processor_layout_matches_transformers_without_resize(image_processor, torch_processor):
    """At a size the processor keeps (multiples of 28 within the bounds) only the patch
    layout and the normalisation are involved: equal up to float32 rounding of the fused
    normalisation."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (168, 280, 3), dtype=np.uint8)
    ref, ref_grid = preprocess_image_for_vit(image_processor, picture)
    ours, grid = preprocess_image_for_vit(torch_processor, picture)
    assert grid == ref_grid == (1, 12, 20)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-5


def test_torch_processor_resize_close_to_transformers(image_processor, torch_processor):
    smooth = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, 9, 16)).astype(np.float32)),
        size=(480, 848), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).round().to(torch.uint8))
    ref, ref_grid = preprocess_image_for_vit(image_processor, smooth)
    ours, grid = preprocess_image_for_vit(torch_processor, smooth)
    assert grid == ref_grid
    diff = (ours - ref).abs()
    if HAS_TORCHVISION:
        assert diff.max() == 0  # same code path
    else:  # PIL's bicubic vs torch's antialiased bicubic: a level or two apart at most
        assert diff.max() < 0.1 and diff.mean() < 2e-3


def test_torch_processor_video_layout_transcription(torch_processor):
    """Row (t, block_row, block_col, merge_row, merge_col), column (channel, frame of the
    temporal pair, patch_row, patch_col) holds normalised pixel frame 2t+f at
    ((2·block_row + merge_row)·14 + patch_row, (2·block_col + merge_col)·14 + patch_col)."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)  # kept size; 3 frames → padded to 4
    pixels, grid = preprocess_video_for_vit(torch_processor, frames)
    assert grid == (2, 4, 6) and pixels.shape == (2 * 4 * 6, 1176)
    mean = np.array([0.48145466, 0.4578275, 0.40821073]) * 255
    std = np.array([0.26862954, 0.26130258, 0.27577711]) * 255
    norm = (frames.astype(np.float64) - mean) / std
    norm = np.concatenate([norm, norm[-1:]])  # temporal padding repeats the last frame
    row = 0
    for t in range(2):
        for block_row in range(2):
            for block_col in range(3):
                for merge_row in range(2):
                    for merge_col in range(2):
                        y, x = (2 * block_row + merge_row) * 14, (2 * block_col + merge_col) * 14
                        patch = norm[2 * t:2 * t + 2, y:y + 14, x:x + 14, :]  # [frame, py, px, c]
                        expected = patch.transpose(3, 0, 1, 2).reshape(-1)
                        np.testing.assert_allclose(pixels[row].numpy(), expected, atol=1e-5)
                        row += 1


def test_image_is_a_two_frame_still(torch_processor):
    picture = np.random.default_rng(3).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    still, grid = preprocess_image_for_vit(torch_processor, picture)
    clip, clip_grid = preprocess_video_for_vit(torch_processor, np.stack([picture, picture]))
    assert grid == clip_grid == (1, 4, 4) and torch.equal(still, clip)


def test_input_types(torch_processor):
    picture = np.random.default_rng(4).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    reference, _ = preprocess_image_for_vit(torch_processor, picture)
    as_float = torch.from_numpy(picture).float() / 255  # ComfyUI IMAGE frames
    assert torch.equal(preprocess_image_for_vit(torch_processor, as_float[None])[0], reference)
    from PIL import Image

    assert torch.equal(preprocess_image_for_vit(torch_processor, Image.fromarray(picture))[0], reference)
    with pytest.raises(BerniniError):
        preprocess_image_for_vit(torch_processor, np.zeros((56, 56), np.uint8))
    with pytest.raises(BerniniError):
        preprocess_video_for_vit(torch_processor, np.zeros((0, 56, 56, 3), np.uint8))


def test_image_path_applies_exif_orientation_like_transformers(tmp_path, torch_processor, image_processor):
    """The official hands the ViT processor a path; transformers' loader applies EXIF orientation."""
    from PIL import Image
    from transformers.image_utils import load_image

    path = tmp_path / "portrait.jpg"
    picture = Image.fromarray(np.random.default_rng(6).integers(0, 256, (168, 280, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    picture.save(path, exif=exif, quality=95)
    opened = vision.open_image_for_vit(path)
    assert opened.size == (168, 280)  # width, height after the rotation
    assert np.array_equal(np.asarray(opened), np.asarray(load_image(str(path))))
    pixels, grid = preprocess_image_for_vit(torch_processor, str(path))
    assert grid == (1, 20, 12)
    assert torch.equal(pixels, preprocess_image_for_vit(torch_processor, opened)[0])
    with pytest.raises(BerniniError, match="does not exist"):
        preprocess_image_for_vit(torch_processor, tmp_path / "missing.png")


@needs_torchvision
def test_torch_processor_equals_transformers_processor(mllm_dir, torch_processor):
    processor = load_vit_processor(mllm_dir)
    rng = np.random.default_rng(5)
    picture = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    clip = rng.integers(0, 256, (6, 240, 427, 3), dtype=np.uint8)
    for fn, data in ((preprocess_image_for_vit, picture), (preprocess_video_for_vit, clip)):
        ours, grid = fn(torch_processor, data)
        ref, ref_grid = fn(processor, data)
        assert grid == ref_grid and torch.equal(ours, ref)


def test_load_vit_processor(mllm_dir, tmp_path):
    processor = load_vit_processor(mllm_dir)
    assert isinstance(processor, TorchVitProcessor) != HAS_TORCHVISION
    with pytest.raises(BerniniError, match="preprocessor_config"):
        load_vit_processor(tmp_path)


# --------------------------------------------------------------------------- target placeholder

def test_target_placeholder_rules():
    assert target_item("t2i", 1, 512, 512) == VisualItem("image", (1, 16, 16))
    assert target_item("i2i", 1, 480, 848) == VisualItem("image", (1, 12, 20))
    # Video tasks without a source video: a black num_frames clip at fps, sampled at fps // 8.
    assert target_item("t2v", 81, 480, 848) == VisualItem("video", (5, 12, 20))
    assert target_item("r2v", 81, 480, 848, fps=30).grid_thw == (4, 12, 20)  # 81/30·3 = 8.1 → 8 frames
    assert target_item("t2v", 121, 512, 512, fps=24).grid_thw == (7, 16, 16)  # 121/24·3 = 15.1 → 14
    # With a source video the target repeats its grid (v2v target grid = source grid).
    source = VisualItem("video", (4, 10, 16))
    for task in ("v2v", "mv2v", "rv2v", "ads2v"):
        assert target_item(task, 81, 480, 848, first_video=source) == source
    # One frame is an image whatever the task asks of a video.
    assert target_item("t2v", 1, 480, 848, first_video=source).kind == "image"
    with pytest.raises(BerniniError, match="num_frames"):
        target_item("t2i", 81, 512, 512)
    with pytest.raises(BerniniError):
        target_item("x2y", 81, 512, 512)
