"""The MaskGIT planning loop (docs/official_behaviour.md §3.5, §3.7, §7.1 items 2–3, §7.2).

All target ViT tokens start as the mask token in the three branches (cond, imgcond, uncond). Each planning
step runs the Qwen model on the branches, turns the target rows of hidden_states[-2] into ViT-decoder
conditions (``connector.for_vit``), samples the tokens this step reveals with the flow-matching ViT decoder
(3-way CFG) and writes them into the target slots of all three branches. Two final forwards (cond, uncond)
are projected by ``connector.for_gen`` into the four renderer contexts of docs/official_behaviour.md §3.7.

Which tokens a step reveals depends only on N, S and the random order, so ``mask_schedule`` computes the
whole schedule up front; steps that reveal nothing (the docs/official_behaviour.md §7.2 skip quirk, or an empty set)
draw no noise and, since the official forwards of such a step have no effect, skip the forwards too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import require
from .branch import BRANCHES, EncodedBranch
from .model import PlannerModel
from .rng import PlannerRng

FORWARD_ORDER = ("cond", "uncond", "imgcond")  # official sample_vit_embed forward order


@dataclass
class PlannerContexts:
    """Renderer contexts after planning (docs/official_behaviour.md §3.7), each [1, L_i, gen_dim] in the run dtype (no
    T5 part yet)."""

    wtxt_wvit: torch.Tensor  # cond branch, every position
    wtxt_wovit: torch.Tensor  # cond branch without the target positions
    wotxt_wvit: torch.Tensor  # cond branch, target positions only (no released guidance mode reads it)
    wotxt_wovit: torch.Tensor  # uncond branch without the target positions
    planned_vit: torch.Tensor  # [1, N, hidden]: the target slots after planning (official pred_vit_embed)


def mask_ratio(step: int, steps: int) -> float:
    """cos(π/2 · (step+1)/steps), evaluated as the official lambda does (numpy cos, same operation order)."""
    return float(np.cos(math.pi / 2.0 * (step + 1) / steps))


def mask_lengths(n_tokens: int, steps: int) -> list[int]:
    """Tokens still masked after each step: max(1, min(#masked − 1, floor(N·ratio)))
    (docs/official_behaviour.md §7.2)."""
    remaining, lengths = n_tokens, []
    for step in range(steps):
        remaining = max(1, min(remaining - 1, int(np.floor(n_tokens * mask_ratio(step, steps)))))
        lengths.append(remaining)
    return lengths


def mask_schedule(n_tokens: int, steps: int, order: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Per planning step, the token indices the ViT decoder predicts (ascending), given the random ``order``
    (default: identity). The masked set is always a prefix of ``order``: step s keeps order[:mask_len_s]
    masked and predicts order[mask_len_s : mask_len_{s-1}], the last step every token still masked. A step
    whose indices sum to 0 — exactly {0}, or nothing — predicts nothing (official ``continue``,
    docs/official_behaviour.md §7.2), so a token 0 skipped this way keeps the mask embedding for good."""
    require(n_tokens >= 1, f"planning needs at least one target token (got {n_tokens}).")
    require(steps >= 1, f"planning_step must be at least 1 (got {steps}).")
    order = np.arange(n_tokens) if order is None else np.asarray(order)
    require(sorted(order.tolist()) == list(range(n_tokens)), "order must be a permutation of range(n_tokens).")
    schedule, remaining = [], n_tokens
    for step, mask_len in enumerate(mask_lengths(n_tokens, steps)):
        revealed = order[:remaining] if step == steps - 1 else order[mask_len:remaining]
        indices = sorted(int(i) for i in revealed)
        schedule.append(indices if sum(indices) != 0 else [])
        remaining = mask_len
    return schedule


@dataclass
class _BranchState:
    branch: EncodedBranch
    embeds: torch.Tensor  # [1, L, hidden]; only the target slots change during planning
    attention: tuple  # ([1, 1, L, L] additive mask, [3, 1, L] position ids), built once
    targets: torch.Tensor  # [N] positions of the target tokens, ascending


@torch.no_grad()
def plan(model: PlannerModel, branches: Mapping[str, EncodedBranch], *, planning_step: int,
         vit_denoising_step: int, vit_txt_cfg: float, vit_img_cfg: Optional[float], dtype: torch.dtype,
         device, rng: PlannerRng, on_step: Optional[Callable[[int, int], None]] = None) -> PlannerContexts:
    """Run docs/official_behaviour.md §3.5 on the encoded branches and return the §3.7 contexts.

    RNG (docs/official_behaviour.md §7.1): one ``np.random.shuffle`` of arange(N) on ``rng.numpy``, then per step that
    predicts anything one ``torch.randn(n, C)`` float32 on ``rng.torch`` (CPU), cast to the run dtype by the decoder;
    ``rng`` (bernini_core/planner/rng.py) stands in for the official global generators. The model's modules must
    already sit on ``device`` (the runtime places them); connector and ViT decoder are cast to ``dtype`` here, as
    the official pipeline does (docs/official_behaviour.md §7.3).
    ``on_step(step, planning_step)`` is called after every planning step (progress, interrupts).
    """
    missing = [name for name in BRANCHES if name not in branches]
    require(not missing, f"plan() needs the branches {BRANCHES}; missing {missing}.")
    n_tokens = branches["cond"].n_target_tokens
    require(n_tokens >= 1, "The cond branch has no target tokens to plan.")
    for name in BRANCHES:
        require(branches[name].n_target_tokens == n_tokens,
                f"branch '{name}' has {branches[name].n_target_tokens} target tokens, cond has {n_tokens}; "
                f"all three branches must share the target (docs/official_behaviour.md §3.4).")
    require(int(vit_denoising_step) >= 1, f"vit_denoising_step must be at least 1 (got {vit_denoising_step}).")
    qwen_dtype = model.language_model.get_input_embeddings().weight.dtype
    require(qwen_dtype == dtype, f"The planner's Qwen model is {qwen_dtype} but planning was asked to run in {dtype}; "
                                 f"load the planner in the run dtype (bf16 for the official numerics, "
                                 f"docs/official_behaviour.md §7.3).")
    device = torch.device(device)
    model.prepare_heads(dtype)

    states = {}
    for name in BRANCHES:  # official encoding order; embedding has no side effects
        branch = branches[name]
        states[name] = _BranchState(
            branch=branch,
            embeds=model.input_embeds(branch, dtype=dtype, device=device),
            attention=model.attention_inputs(branch, dtype=dtype, device=device),
            targets=branch.visual_output_mask.nonzero().squeeze(-1).to(device),
        )

    order = np.arange(n_tokens)
    rng.numpy.shuffle(order)
    schedule = mask_schedule(n_tokens, int(planning_step), order)

    channels = model.vit_decoder.channels
    for step, predict in enumerate(schedule):
        if predict:
            conditions = {}
            for name in FORWARD_ORDER:
                state = states[name]
                hidden = model.hidden(state.embeds, state.branch, attention=state.attention)
                conditions[name] = model.connector.for_vit(hidden[:, state.targets])[0]  # [N, C]
            index = torch.tensor(predict, dtype=torch.long, device=device)
            noise = torch.randn(len(predict), channels, dtype=torch.float32, generator=rng.torch)  # CPU
            sampled = model.vit_decoder.sample(
                conditions["cond"][index], conditions["uncond"][index], conditions["imgcond"][index],
                txt_cfg=vit_txt_cfg, img_cfg=vit_img_cfg, steps=int(vit_denoising_step), noise=noise,
            ).to(dtype)
            for state in states.values():
                state.embeds[0, state.targets[index]] = sampled
        if on_step is not None:
            on_step(step + 1, int(planning_step))

    cond, uncond = states["cond"], states["uncond"]
    cond_context = model.connector.for_gen(model.hidden(cond.embeds, cond.branch, attention=cond.attention))
    uncond_context = model.connector.for_gen(model.hidden(uncond.embeds, uncond.branch, attention=uncond.attention))
    cond_targets = cond.branch.visual_output_mask.to(device)
    uncond_targets = uncond.branch.visual_output_mask.to(device)
    return PlannerContexts(
        wtxt_wvit=cond_context,
        wtxt_wovit=cond_context[:, ~cond_targets],
        wotxt_wvit=cond_context[:, cond_targets],
        wotxt_wovit=uncond_context[:, ~uncond_targets],
        planned_vit=cond.embeds[:, cond.targets].clone(),
    )
