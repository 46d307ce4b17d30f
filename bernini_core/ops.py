"""The layer namespace every model class builds from (docs/architecture.md §5).

Models never instantiate ``torch.nn.Linear`` & co. directly; they take an ``ops``
object with the attributes below. Standalone (tests, CLI) that is ``torch.nn``
itself; inside ComfyUI the bridge passes ComfyUI's cast/offload operations
(``comfy.ops.manual_cast`` / ``disable_weight_init``), which is what lets
``--lowvram`` stream weights layer by layer.

Required attributes: Linear, Conv2d, Conv3d, LayerNorm, GroupNorm, Embedding.
"""

import torch.nn

DEFAULT_OPS = torch.nn


def resolve_ops(ops=None):
    """``ops`` or the plain torch.nn namespace when None."""
    return DEFAULT_OPS if ops is None else ops
