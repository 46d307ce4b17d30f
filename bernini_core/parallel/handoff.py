"""What the group leader hands the other ranks of its replica before sampling.

Only the DiT is sharded. The leader of each data-parallel replica runs everything else once — text encoding,
source encoding, planning — and sends the small results the sampler needs (a few MB: the contexts and the
source latents, plus the geometry) to the replica's other ranks, which hold only the experts. The objects are
sent as tensors plus a JSON header (exchange.py), never pickled. A failure on the leader is sent too, so the
other ranks stop with its message instead of waiting for data that never comes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import BerniniError
from ..stages import PromptEmbeds, Sources
from .exchange import broadcast_json, broadcast_tensors


def pack_renderer(embeds: PromptEmbeds, sources: Sources) -> tuple[dict, dict]:
    tensors = {"positive": embeds.positive, "negative": embeds.negative}
    tensors.update({f"video.{i}": v for i, v in enumerate(sources.videos)})
    tensors.update({f"image.{i}": v for i, v in enumerate(sources.images)})
    meta = {"task": sources.task, "frame_count": sources.frame_count, "height": sources.height,
            "width": sources.width, "n_videos": len(sources.videos), "n_images": len(sources.images),
            "positive_text": embeds.positive_text, "negative_text": embeds.negative_text,
            "model_family": embeds.model_family}
    return tensors, meta


def unpack_renderer(tensors: dict, meta: dict) -> tuple[PromptEmbeds, Sources]:
    embeds = PromptEmbeds(task=meta["task"], positive=tensors["positive"], negative=tensors["negative"],
                          positive_text=meta["positive_text"], negative_text=meta["negative_text"],
                          model_family=meta["model_family"])
    sources = Sources(task=meta["task"], videos=[tensors[f"video.{i}"] for i in range(meta["n_videos"])],
                      images=[tensors[f"image.{i}"] for i in range(meta["n_images"])],
                      frame_count=meta["frame_count"], height=meta["height"], width=meta["width"])
    return embeds, sources


def pack_full(plan, sources) -> tuple[dict, dict]:
    tensors = {f"context.{name}": ctx for name, ctx in plan.contexts.items()}
    tensors.update({f"video.{i}": v for i, v in enumerate(sources.videos)})
    tensors.update({f"image.{i}": v for i, v in enumerate(sources.images)})
    meta = {"task": plan.task, "version": plan.version, "model_family": plan.model_family,
            "contexts": list(plan.contexts), "n_videos": len(sources.videos), "n_images": len(sources.images),
            "target_latent_shape": list(sources.target_latent_shape)}
    return tensors, meta


def unpack_full(tensors: dict, meta: dict):
    from ..pipeline_full import Plan, PlannerSources

    plan = Plan(task=meta["task"], contexts={name: tensors[f"context.{name}"] for name in meta["contexts"]},
                model_family=meta["model_family"], version=meta["version"])
    sources = PlannerSources(task=meta["task"], videos=[tensors[f"video.{i}"] for i in range(meta["n_videos"])],
                             images=[tensors[f"image.{i}"] for i in range(meta["n_images"])],
                             target_latent_shape=tuple(meta["target_latent_shape"]),
                             model_family=meta["model_family"])
    return plan, sources


def share_from_leader(state, prepare: Callable[[], Any], pack: Callable, unpack: Callable):
    """On the replica leader: run `prepare()` (the stages before sampling) and send its result; elsewhere:
    receive it. Every rank returns the same objects (the leader its own)."""
    src, group = state.replica_leader, state.replica_group
    if state.is_replica_leader:
        try:
            result = prepare()
            tensors, meta = pack(*result)
        except BaseException as exc:
            broadcast_json({"error": f"{type(exc).__name__}: {exc}"}, src, group)
            raise
        broadcast_json({"error": None, **meta}, src, group)
        broadcast_tensors(tensors, src, group)
        return result
    meta = broadcast_json(None, src, group)
    if meta.get("error"):
        raise BerniniError(f"the group leader (rank {src}) failed before sampling: {meta['error']}")
    tensors = broadcast_tensors(None, src, group)
    return unpack(tensors, meta)
