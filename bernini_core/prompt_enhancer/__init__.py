"""Prompt enhancement: the official ``--use_pe`` rewrite of the user's prompt per task, through an OpenAI-compatible
endpoint ("openai") or a local Qwen2.5-VL — the full-Bernini planner's own model ("local") — with the same
conversation (docs/prompt_enhancer.md).

    from bernini_core.prompt_enhancer import enhance
    enhance("v2v", "make it snow", {"video": "input.mp4"})                       # endpoint from BERNINI_PE_* / OPENAI_*
    enhance("v2v", "make it snow", {"video": "input.mp4"}, backend="local", planner=pipe)   # the planner's Qwen
    enhance("t2v", "a fox", backend="local", folder="Qwen2.5-VL-7B-Instruct")   # any Qwen2.5-VL folder

On any failure of the endpoint (after bounded retries) or an answer without a prompt, the user's prompt comes back
unchanged with one warning line, as the official does. Bad input (unknown task or backend, no API key, a local
backend without a model) is a BerniniError before any work.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import BerniniError
from ..tasks import get_task
from .endpoint import EndpointBackend, EndpointSettings, EnhanceFailed, endpoint_settings
from .frames import FRAMES_PER_VIDEO, source_pictures
from .local import DEFAULT_MAX_NEW_TOKENS, LocalBackend
from .templates import EnhanceRequest, build_request, parse_answer

log = logging.getLogger("bernini.prompt_enhancer")

BACKENDS = ("openai", "local")
_ENDPOINT_OPTIONS = {"model", "api_key", "base_url", "timeout", "attempts", "backoff", "client",
                     "max_completion_tokens", "settings"}
_LOCAL_OPTIONS = {"planner", "folder", "runtime", "device", "dtype", "offload", "max_new_tokens", "seed",
                  "temperature", "top_p", "repetition_penalty"}

__all__ = ["BACKENDS", "DEFAULT_MAX_NEW_TOKENS", "FRAMES_PER_VIDEO", "EndpointBackend", "EndpointSettings",
           "EnhanceFailed", "EnhanceRequest", "LocalBackend", "build_request", "endpoint_settings", "enhance",
           "make_backend", "parse_answer", "request_for"]


def make_backend(backend: str = "openai", **options):
    """An EndpointBackend ("openai": model / api_key / base_url default to the environment, timeout, attempts,
    backoff, client) or a LocalBackend ("local": ``planner=`` a full-Bernini pipeline / planner, or ``folder=`` a
    Qwen2.5-VL or Bernini-Diffusers folder with device / dtype / offload; max_new_tokens, seed, temperature, top_p)."""
    if backend not in BACKENDS:
        raise BerniniError(f"prompt enhancer: backend {backend!r} is not one of {', '.join(BACKENDS)} (openai = an "
                           "OpenAI-compatible endpoint, local = the planner's Qwen2.5-VL or a Qwen2.5-VL folder).")
    allowed = _ENDPOINT_OPTIONS if backend == "openai" else _LOCAL_OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BerniniError(f"prompt enhancer: option(s) {unknown} do not apply to the {backend} backend; it takes "
                           f"{', '.join(sorted(allowed))}.")
    if backend == "openai":
        return EndpointBackend(**options)
    planner, folder = options.pop("planner", None), options.pop("folder", None)
    placement = {k: options.pop(k) for k in ("device", "dtype", "offload") if k in options}
    if planner is not None:
        if placement:
            raise BerniniError(f"prompt enhancer: {', '.join(sorted(placement))} apply to a model loaded from folder=; "
                               "the planner's model runs where the planner runs.")
        return LocalBackend.from_planner(planner, folder=folder, **options)
    if folder is None:
        raise BerniniError("prompt enhancer (local backend): give planner= (a full-Bernini pipeline or planner: its "
                           "Qwen2.5-VL) or folder= (a Qwen2.5-VL or Bernini-Diffusers folder).")
    return LocalBackend.from_folder(folder, **placement, **options)


def request_for(task: str, prompt: str, sources: Optional[dict] = None) -> EnhanceRequest:
    """The conversation for one prompt: the task's template and the pictures it shows (frames of each source video,
    then the reference images)."""
    get_task(task)
    frames, references = source_pictures(task, sources)
    return build_request(task, prompt, frames=frames, references=references)


def enhance(task: str, prompt: str, sources: Optional[dict] = None, backend="openai", **options) -> str:
    """The prompt rewritten for ``task`` by ``backend`` ("openai", "local", or a backend object from make_backend,
    reused across calls), seeing ``sources`` ({"video": ..., "image": ..., "images": ...}: paths or in-memory
    frames / images). A blank prompt is returned as it is; a backend failure or an answer holding no prompt returns
    ``prompt`` unchanged with one warning line."""
    get_task(task)
    if not isinstance(prompt, str):
        raise BerniniError(f"prompt enhancer: prompt must be a string, got {type(prompt).__name__} {prompt!r}.")
    if isinstance(backend, str):
        backend = make_backend(backend, **options)
    elif options:
        raise BerniniError(f"prompt enhancer: options {sorted(options)} go to make_backend(); a backend object "
                           "already has its settings.")
    if not prompt.strip():
        return prompt  # the official returns an empty prompt as it is
    request = request_for(task, prompt, sources)
    try:
        answer = backend.chat(request)
    except EnhanceFailed as exc:
        log.warning("prompt enhancer: %s; using the original prompt.", exc)
        return prompt
    text = parse_answer(answer, request.json_answer, task)
    if not text:
        log.warning("prompt enhancer: the %s backend's answer holds no prompt; using the original prompt.",
                    getattr(backend, "name", "prompt"))
        return prompt
    return text
