"""Writes workflows/inputs/: the small example media the shared workflows load out of the box.

Run from the repository root: python docs/dev/gen_example_media.py (development tool; not shipped, see .comfyignore)
Everything is drawn here with numpy (no third-party footage): a synthetic street scene for the video-editing
workflows, a short clip to insert for ads2v, and a reference object for r2v. The pixels are a pure function of the
frame index; the MP4 bytes depend on the local libx264 build, so tests check the decoded content, not the bytes.
The pack's __init__.py copies these files into ComfyUI's input/ folder when absent (bernini_core/example_inputs.py).
"""

from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path.cwd()
OUT = ROOT / "workflows" / "inputs"
FPS, FRAMES = 16, 81  # the official rate and frame count (81 = 4n+1 frames at 16 fps: the presets keep them all)
SOURCE_SIZE = (832, 480)  # width, height: the Wan 480p landscape size
REFERENCE_SIZE = (480, 272)


def _grid(width, height):
    return np.mgrid[0:height, 0:width].astype(np.float32)


def street_frame(index, width, height):
    """A camera panning along a row of houses under a gradient sky while a red ball rolls along the pavement."""
    y, x = _grid(width, height)
    t = index / FRAMES
    img = np.empty((height, width, 3), np.float32)
    sky = (y / (0.55 * height))[..., None]
    img[:] = (1 - sky) * np.array([90, 150, 230]) + sky * np.array([200, 225, 250])
    ground = y > 0.62 * height
    img[ground] = [110, 110, 115]
    img[(y > 0.60 * height) & (y <= 0.62 * height)] = [180, 180, 170]  # the kerb
    pan = x + 160 * t * width / 832  # the camera moves right: the houses slide left
    house = (pan // 150).astype(int)
    inside = (pan % 150 > 15) & (pan % 150 < 135)
    tops = 0.25 * height + 0.08 * height * ((house * 37) % 5) / 4
    walls = inside & (y > tops) & (y <= 0.60 * height)
    palette = np.array([[200, 120, 90], [230, 200, 140], [150, 170, 120], [210, 210, 200], [170, 110, 140]])
    img[walls] = palette[house[walls] % len(palette)]
    window = walls & ((pan % 150) % 40 > 22) & ((y - tops) % 50 > 15) & ((y - tops) % 50 < 35)
    img[window] = [60, 80, 110]
    cx, cy, r = (0.1 + 0.8 * t) * width, 0.78 * height, 0.07 * height
    ball = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    shade = 1 - 0.5 * np.clip(((x - cx + 0.4 * r) ** 2 + (y - cy + 0.4 * r) ** 2) / (2 * r * r), 0, 1)
    img[ball] = (np.array([220, 40, 40]) * shade[ball, None])
    return img.clip(0, 255).astype(np.uint8)


def screen_frame(index, width, height):
    """The clip to insert: a colour wheel turning on a dark screen with a bar that fills up."""
    y, x = _grid(width, height)
    angle = np.arctan2(y - height / 2, x - width / 2) + 2 * np.pi * index / FRAMES
    radius = np.hypot(y - height / 2, x - width / 2)
    img = np.full((height, width, 3), 25, np.float32)
    wheel = radius < 0.38 * height
    for channel, phase in enumerate((0, 2 * np.pi / 3, 4 * np.pi / 3)):
        img[..., channel][wheel] = 127 + 127 * np.cos(angle[wheel] + phase)
    bar = (y > 0.88 * height) & (y < 0.94 * height) & (x < width * (index + 1) / FRAMES)
    img[bar] = [240, 240, 240]
    return img.clip(0, 255).astype(np.uint8)


def reference_image(size=512):
    """A shaded blue cube on white: a clear single subject for the reference-image workflows."""
    y, x = _grid(size, size)
    img = np.full((size, size, 3), 245, np.float32)
    c, s = size / 2, size * 0.22
    front = (np.abs(x - c + s * 0.3) < s) & (np.abs(y - c - s * 0.3) < s)
    top = (y < c - s * 0.7) & (y > c - s * 1.9) & (x - c + s * 1.3 > (c - s * 0.7 - y)) & \
          (x - c - s * 0.7 < (c - s * 0.7 - y)) & ~front
    side = (x > c + s * 0.7) & (x < c + s * 1.9) & (y - c - s * 1.3 < -(x - c - s * 0.7)) & \
           (y - c + s * 0.7 > -(x - c - s * 0.7)) & ~front
    img[front], img[top], img[side] = [40, 90, 200], [90, 140, 235], [25, 60, 150]
    return img.astype(np.uint8)


def write_video(path, draw, size, crf=30):
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryslow", "threads": "1"}  # one thread: reproducible output
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(draw(index, *size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


MEDIA = {
    "bernini_source.mp4": lambda p: write_video(p, street_frame, SOURCE_SIZE),
    "bernini_reference.mp4": lambda p: write_video(p, screen_frame, REFERENCE_SIZE),
    "bernini_reference.png": lambda p: Image.fromarray(reference_image()).save(p, optimize=True),
}


def main():
    OUT.mkdir(exist_ok=True)
    for name, write in MEDIA.items():
        write(OUT / name)
        print("wrote", name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
