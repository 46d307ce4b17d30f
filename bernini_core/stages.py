"""The small objects that cross stage boundaries (docs/architecture.md §6).

Each is what one node hands the next in ComfyUI, and what the pipeline passes between its
stage methods: prompt embeddings (with the task, chosen once), preprocessed sources with
their VAE latents, and the final output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class PromptEmbeds:
    """UMT5 features of the positive and negative prompt, each trimmed to its true length."""

    task: str
    positive: torch.Tensor  # [L_pos, D]
    negative: torch.Tensor  # [L_neg, D]
    positive_text: str  # exactly what UMT5 saw
    negative_text: str
    model_family: str = "bernini_renderer"  # which renderer family these features are for


@dataclass
class Sources:
    """Preprocessed conditioning media as normalised Wan latents, in the official order.

    `videos`: one [1,16,T,h,w] latent per source video (ads2v: source video, then reference video).
    `images`: one [1,16,1,h,w] latent per image (the edited image first, then the references).
    `frame_count/height/width`: the output geometry the sources fix (first video, else the
    i2i image), or None when no source fixes it (docs/official_behaviour.md §4.8).
    """

    task: str
    videos: list = field(default_factory=list)
    images: list = field(default_factory=list)
    frame_count: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None

    @property
    def n_videos(self) -> int:
        return len(self.videos)

    @property
    def n_images(self) -> int:
        return len(self.images)


@dataclass
class BerniniOutput:
    """What a pipeline call returns."""

    frames: torch.Tensor  # float32 [F,H,W,3] in 0..1 on the CPU
    latents: torch.Tensor  # raw (un-normalised) Wan 2.1 latents [1,16,T,H/8,W/8], ComfyUI's LATENT convention
    settings: dict[str, Any]  # every setting the run used (preset values merged with the caller's)
    prompt_text: str = ""  # the positive text the text encoder saw
    output_path: Optional[str] = None
