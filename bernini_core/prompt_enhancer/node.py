"""The engine side of Enhance Bernini Prompt (re-exported by node_api; no ComfyUI import).

The endpoint's key, base URL and model come from the environment (docs/prompt_enhancer.md §4), never from a widget:
nothing secret is stored in a workflow, the history or a log. Nothing contacts the network unless this node runs
with backend "openai".
"""

from __future__ import annotations

import logging
from typing import Optional

from .. import comfy_bridge
from ..errors import BerniniError
from ..tasks import TASK_NAMES, get_task
from . import enhance, make_backend
from .local import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger("bernini.nodes")

NODE = "Enhance Bernini Prompt"
ENHANCE_BACKENDS = ("local", "openai")  # the node's choices: local first (no network, no key)
MAX_NEW_TOKENS_LIMIT = 8192
# The sources each task's template looks at (templates.build_request): the others are not sent.
_LOOKS_AT = {"v2v": ("source_video",), "mv2v": ("source_video",), "ads2v": ("source_video", "reference_video"),
             "i2i": ("source_image", "reference_images"), "r2v": ("source_image", "reference_images"),
             "rv2v": ("source_video", "source_image", "reference_images")}
_NEEDS = {"v2v": "source_video", "mv2v": "source_video", "rv2v": "source_video", "ads2v": "source_video",
          "i2i": "source_image", "r2v": "reference_images"}


def _frames(value, input_name: str):
    """A ComfyUI IMAGE [F,H,W,C] (float 0..1) as a numpy batch, checked."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    array = value if hasattr(value, "shape") else np.asarray(value)
    if len(array.shape) == 3:
        array = array[None]
    if len(array.shape) != 4 or array.shape[-1] not in (3, 4) or array.shape[0] == 0:
        raise BerniniError(f"{NODE}: {input_name} must be an IMAGE batch [frames, height, width, 3]; got shape "
                           f"{tuple(array.shape)}.")
    return array


def enhance_prompt(task: str, prompt: str, backend: str = "local", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   sampling: bool = False, sampling_seed: int = 0, planner=None, source_video=None,
                   source_image=None, reference_images=None, reference_video=None, endpoint_model: str = "") -> str:
    """The prompt rewritten for ``task`` (the official --use_pe conversation) by the planner's Qwen2.5-VL (backend
    "local", ``planner`` connected) or an OpenAI-compatible endpoint configured by the environment ("openai")."""
    get_task(task)
    if not isinstance(prompt, str):
        raise BerniniError(f"{NODE}: prompt must be a string, got {type(prompt).__name__} {prompt!r}.")
    if backend not in ENHANCE_BACKENDS:
        raise BerniniError(f"{NODE}: backend {backend!r} must be one of {', '.join(ENHANCE_BACKENDS)}.")
    if not prompt.strip():
        raise BerniniError(f"{NODE}: prompt is empty; write the idea or the edit to enhance.")
    given = {"source_video": source_video, "source_image": source_image, "reference_images": reference_images,
             "reference_video": reference_video}
    unused = [name for name, value in given.items() if value is not None and name not in _LOOKS_AT.get(task, ())]
    if unused:
        log.warning("%s: %s ignored: the %s template does not look at %s.", NODE, ", ".join(unused), task,
                    "it" if len(unused) == 1 else "them")
    needed = _NEEDS.get(task)
    if needed and given[needed] is None and not (task in ("r2v",) and source_image is not None):
        log.warning("%s: no %s connected; the %s prompt is rewritten without seeing it.", NODE, needed, task)

    if backend == "openai":
        if planner is not None:
            log.warning("%s: the planner input is ignored by the openai backend.", NODE)
        model = endpoint_model.strip() if isinstance(endpoint_model, str) else ""
        chosen = make_backend("openai", model=model or None)
    else:
        if planner is None:
            raise BerniniError(f"{NODE}: backend 'local' runs the planner's Qwen2.5-VL: connect the planner output of "
                               "Load Bernini Planner (Bernini-Diffusers or -v2), or choose backend 'openai'.")
        if isinstance(endpoint_model, str) and endpoint_model.strip():
            log.warning("%s: endpoint_model is ignored by the local backend.", NODE)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise BerniniError(f"{NODE}: max_new_tokens {max_new_tokens!r} must be a whole number in "
                               f"1..{MAX_NEW_TOKENS_LIMIT}.")
        chosen = make_backend("local", planner=planner, runtime=comfy_bridge.runtime(),
                              folder=_planner_folder(planner), max_new_tokens=max_new_tokens,
                              seed=int(sampling_seed) if sampling else None)

    videos = [_frames(v, n) for n, v in (("source_video", source_video), ("reference_video", reference_video))
              if v is not None]
    images = [] if source_image is None else list(_frames(source_image, "source_image"))
    references = [] if reference_images is None else list(_frames(reference_images, "reference_images"))
    sources = {"video": videos or None, "image": images or None, "images": references or None}
    return enhance(task, prompt, sources, backend=chosen)


def _planner_folder(planner) -> Optional[str]:
    """The models/bernini folder a Load Bernini Planner output came from (its untied lm_head is read there), or None
    where it cannot be found (a tied head needs none; an untied one then says what is missing)."""
    name = getattr(planner, "name", "")
    if not name:
        return None
    try:
        return str(comfy_bridge.model_path("bernini", name))
    except BerniniError:
        return None


__all__ = ["ENHANCE_BACKENDS", "MAX_NEW_TOKENS_LIMIT", "TASK_NAMES", "enhance_prompt"]
