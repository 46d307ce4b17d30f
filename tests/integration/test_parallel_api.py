"""The Python entry of the multi-process engine: inside an initialised process group,
`BerniniPipeline.from_pretrained(path, parallel=ParallelConfig(...))` builds the groups, the leader loads every
part and the other ranks only the experts, and a call gives the one-process result on the leader."""

import torch

from bernini_core import BerniniPipeline
from parallel_tools import run_world

SETTINGS = dict(num_frames=5, height=32, width=48, num_inference_steps=3, seed=11)


def render_in_rank(rank, world_size, path):
    from bernini_core.parallel import ParallelConfig

    pipe = BerniniPipeline.from_pretrained(path, device="cpu", dtype="fp32", parallel=ParallelConfig(ulysses=2))
    out = pipe("t2v", "a red fox in the snow", **SETTINGS)
    return {"parts": sorted(pipe.parts), "leader": pipe.is_leader,
            "latents": None if out.latents is None else out.latents.flatten().tolist()}


def test_from_pretrained_with_a_parallel_config_equals_one_process(tiny_renderer_dir):
    reference = BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="fp32")(
        "t2v", "a red fox in the snow", **SETTINGS).latents.flatten()
    leader, other = run_world(render_in_rank, 2, str(tiny_renderer_dir), timeout=240)
    assert leader["leader"] and leader["parts"] == ["experts", "text_encoder", "vae"]
    assert not other["leader"] and other["parts"] == ["experts"] and other["latents"] is None
    got = torch.tensor(leader["latents"])
    assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5
