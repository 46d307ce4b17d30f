"""Test helper: what a written output file holds, decoded independently with PyAV / Pillow."""

from pathlib import Path

import av
from PIL import Image


def probe(path: Path):
    """(frame count, height, width, fps) of a written file (fps None for a PNG)."""
    path = Path(path)
    if path.suffix == ".png":
        with Image.open(path) as img:
            return 1, img.height, img.width, None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return len(frames), frames[0].shape[0], frames[0].shape[1], float(stream.average_rate)
