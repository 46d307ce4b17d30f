"""The sampler's step loop never makes the host wait on the device, and recomputes nothing that is constant.

On a GPU, reading a device tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, boolean
indexing, ``nonzero`` ...) stalls the host until the device has finished everything queued, so the next forward is
queued late and the device idles. These tests run a few steps of the tiny Bernini-R on the CPU under a
TorchFunctionMode that models which tensors would live on the device: the experts' parameters and buffers, tensors
created or moved with an explicit device, and everything computed from those. Host tensors (the scheduler's CPU
tables) stay host tensors. Every value read of a device tensor is recorded with the code line that made it.

The one allowed read per step is the lagged finite check of denoise.py (the previous step's flag, read after the
current step's forwards are queued), plus the final result leaving the device once after the loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

import bernini_core.pipeline as pipeline_module

STEPS = 3
ARMS_PER_STEP = 2  # t2v_apg, the t2v preset: negative then positive text (docs/official_behaviour.md §5.1)
SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=STEPS, seed=1)

# Calls that read a device tensor's value on the host (each is a device->host copy the host waits for).
VALUE_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "is_nonzero", "tolist", "numpy", "cpu",
               "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose"}
FACTORIES_WITH_DEVICE = {"full", "zeros", "ones", "empty", "arange", "linspace", "tensor", "as_tensor", "randn",
                         "rand", "randint", "zeros_like", "ones_like", "empty_like", "full_like"}
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
THIS_FILE = str(Path(__file__).resolve())


def _is_host_string(device) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class SyncRecorder(TorchFunctionMode):
    """Records (kind, where) for every host read of a device tensor; `marks` interleaves forward/step markers."""

    def __init__(self, device_modules):
        super().__init__()
        self.device = WeakIdKeyDictionary()
        for module in device_modules:
            for tensor in (*module.parameters(), *module.buffers()):
                self.device[tensor] = True
        self.events: list[tuple] = []

    def mark(self, *event) -> None:
        self.events.append(event)

    def _on_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value in self.device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        any_device = any(self._on_device(v) for v in inputs)
        subject = args[0] if args else None
        read = None
        if name in VALUE_READS and any_device:
            read = name
        elif name == "to" and self._on_device(subject) and (
                any(_is_host_string(a) for a in args[1:]) or _is_host_string(kwargs.get("device"))):
            read = "to('cpu')"
        elif name in ("__getitem__", "__setitem__", "index_put_") and any_device and any(
                v.dtype == torch.bool for v in inputs[1:]):
            read = f"{name} with a boolean mask"
        elif name == "copy_" and len(args) > 1 and self._on_device(args[1]) and not self._on_device(subject):
            read = "copy_ to host"
        if read is not None:
            self.events.append(("read", read, _caller()))
        out = func(*args, **kwargs)
        device_kw = kwargs.get("device")
        explicit_device = (name in FACTORIES_WITH_DEVICE or name == "to") and device_kw is not None \
            and not _is_host_string(device_kw)
        moved = name == "to" and any(isinstance(a, torch.device) and a.type != "meta" for a in args[1:])
        if (any_device and read != "to('cpu')" and read != "copy_ to host") or explicit_device or moved:
            for value in pytree.tree_leaves(out):
                if isinstance(value, torch.Tensor):
                    self.device[value] = True
        return out


def _caller() -> str:
    """file:function:line of the innermost frame outside torch and this recorder."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = str(Path(frame.f_code.co_filename).resolve())
        if not filename.startswith(TORCH_DIR) and not (filename == THIS_FILE and frame.f_code.co_name in (
                "__torch_function__", "_caller")):
            return f"{Path(filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def record_sampling(pipe, monkeypatch, steps: int = STEPS) -> SyncRecorder:
    """Run a t2v render of `steps` steps with the recorder active around the sampling loop only."""
    experts = [h.module for h in (pipe.experts.high, pipe.experts.low) if h is not None]
    recorder = SyncRecorder(experts)
    hooks = [handle.module.register_forward_pre_hook(lambda *_, _n=handle.name: recorder.mark("forward", _n))
             for handle in (pipe.experts.high, pipe.experts.low) if handle is not None]
    original = pipeline_module.renderer_denoise

    def recorded_denoise(*args, on_step=None, **kwargs):
        def step_done(index, total, sample):
            recorder.mark("step_done", index)
            if on_step is not None:
                on_step(index, total, sample)

        with recorder:
            out = original(*args, on_step=step_done, **kwargs)
        recorder.mark("returned")
        return out

    monkeypatch.setattr(pipeline_module, "renderer_denoise", recorded_denoise)
    try:
        pipe("t2v", "a fox", **dict(SMALL, num_inference_steps=steps))
    finally:
        for hook in hooks:
            hook.remove()
    return recorder


def check_step_loop(events: list, steps: int) -> dict:
    """Split the events at the step markers and assert: no read before the first forward (setup), in step k ≥ 1
    exactly one read, the lagged finite check of step k − 1, made after step k's forwards were queued; step 0 none;
    after the loop the last step's check and the result's one copy to the host. AssertionError names any other."""
    windows, current = [], []
    setup = []
    started = False
    for event in events:
        if event[0] == "forward":
            started = True
        if not started:
            setup.append(event)
        elif event[0] == "step_done":
            windows.append(current)
            current = []
        else:
            current.append(event)
    after = current
    assert len(windows) == steps, f"expected {steps} steps, saw {len(windows)}"

    def reads(window):
        return [e for e in window if e[0] == "read"]

    def lagged(event):
        return ":_read:" in event[2] and "denoise.py" in event[2] and event[1] == "__bool__"

    assert not reads(setup), f"host reads of device tensors before the first forward: {reads(setup)}"
    for index, window in enumerate(windows):
        unexpected = [e for e in reads(window) if not lagged(e)]
        assert not unexpected, f"step {index}: host reads of device tensors in the step loop: {unexpected}"
        checks = [i for i, e in enumerate(window) if e[0] == "read"]
        assert len(checks) == (0 if index == 0 else 1), f"step {index}: {len(checks)} finite checks"
        if checks:  # lagged: this step's forwards were queued before the previous step's flag is read
            first_forward = next(i for i, e in enumerate(window) if e[0] == "forward")
            assert first_forward < checks[0], f"step {index}: the finite check came before the step's forwards"
    final = reads(after)
    kinds = sorted(e[1] for e in final)
    assert kinds == ["__bool__", "cpu"] and lagged(next(e for e in final if e[1] == "__bool__")), \
        f"after the loop: expected the last finite check and the result's copy, got {final}"
    return {"forwards": sum(1 for e in events if e[0] == "forward"),
            "finite_checks": sum(1 for e in events if e[0] == "read" and lagged(e))}


@pytest.fixture
def pipe(fp32_renderer):
    return fp32_renderer  # the shared tiny Bernini-R in fp32 on the CPU (tests/conftest.py)


def test_the_step_loop_reads_nothing_from_the_device_but_the_lagged_check(pipe, monkeypatch):
    recorder = record_sampling(pipe, monkeypatch)
    summary = check_step_loop(recorder.events, STEPS)
    assert summary == {"forwards": STEPS * ARMS_PER_STEP, "finite_checks": STEPS}


def test_an_item_in_the_dit_forward_is_caught(pipe, monkeypatch):
    """The recorder must see a sync planted in the DiT forward (e.g. someone logging a norm with .item())."""
    dit = pipe.experts.high.module
    original = type(dit).forward

    def forward_with_item(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._last_norm = out.float().norm().item()
        return out

    monkeypatch.setattr(type(dit), "forward", forward_with_item)
    recorder = record_sampling(pipe, monkeypatch, steps=2)
    with pytest.raises(AssertionError, match=r"'item', 'test_no_host_sync.py:forward_with_item"):
        check_step_loop(recorder.events, 2)


def test_a_non_lagged_finite_check_is_caught(pipe, monkeypatch):
    """The old per-step check (bool(isfinite(sample).all()) right after the scheduler step) is a sync the test sees."""
    import bernini_core.denoise as denoise_module

    original = denoise_module.LaggedFiniteCheck.push

    def push_and_check_now(self, sample, index, expert):
        if not bool(torch.isfinite(sample).all()):
            raise AssertionError("unreachable: finite sample")
        return original(self, sample, index, expert)

    monkeypatch.setattr(denoise_module.LaggedFiniteCheck, "push", push_and_check_now)
    recorder = record_sampling(pipe, monkeypatch, steps=2)
    with pytest.raises(AssertionError, match="push_and_check_now"):
        check_step_loop(recorder.events, 2)


def test_constant_inputs_are_computed_once(pipe, monkeypatch):
    """Per step one time embedding shared by the arms; per expert one text projection per context and one RoPE
    table per stream layout; the arms' forwards all receive the same embedded time."""
    counts = {"time": 0, "text": 0, "forward": 0}
    times_seen = []
    hooks = []
    experts = [pipe.experts.high.module, pipe.experts.low.module]
    for dit in experts:
        dit.rope_cache.clear()
        hooks.append(dit.condition_embedder.time_embedder.register_forward_hook(
            lambda *_: counts.__setitem__("time", counts["time"] + 1)))
        hooks.append(dit.condition_embedder.text_embedder.register_forward_hook(
            lambda *_: counts.__setitem__("text", counts["text"] + 1)))
        hooks.append(dit.register_forward_pre_hook(
            lambda module, args, kwargs: (counts.__setitem__("forward", counts["forward"] + 1),
                                          times_seen.append(kwargs.get("embedded_time"))) and None,
            with_kwargs=True))
    builds_before = [dit.rope_cache.builds for dit in experts]
    try:
        pipe("t2v", "a fox", **SMALL)
    finally:
        for hook in hooks:
            hook.remove()
    assert counts["forward"] == STEPS * ARMS_PER_STEP
    assert counts["time"] == STEPS  # was STEPS * ARMS_PER_STEP when every forward embedded its timestep
    # 3 steps at shift 5: timesteps 999, 908, 713 (docs/official_behaviour.md §4.6) -> high, high, low: each expert
    # projects the positive and the negative context once.
    assert counts["text"] == 2 * 2
    assert [dit.rope_cache.builds - before for dit, before in zip(experts, builds_before)] == [1, 1]
    assert all(t is not None for t in times_seen)
    assert [id(t) for t in times_seen[::2]] == [id(t) for t in times_seen[1::2]]  # both arms of a step share it


def test_the_lagged_check_names_the_step_and_expert_that_went_non_finite(pipe, tmp_path):
    """NaN weights in the low-noise expert: steps 1-2 (high) are finite, step 3 (low, the last) is not; its flag is
    read only after the loop, and the error still names step 3 and dit_low; no file is written."""
    from bernini_core import BerniniError

    weight = next(pipe.experts.low.module.parameters())
    saved = weight.detach().clone()
    out = tmp_path / "nan.mp4"
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(BerniniError, match=r"sampling step 3/3 \(dit_low\) produced non-finite latents"):
            pipe("t2v", "a fox", output_path=str(out), **SMALL)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not out.exists()


def test_a_shared_time_embedding_gives_the_same_velocity(pipe):
    """embed_time once, passed to forward (as `embedded_time` or in place of the timestep), gives exactly what the
    forward computes from the raw timestep; one made from another timestep tensor is refused."""
    from bernini_core import BerniniError

    dit = pipe.experts.high.module
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 2, 4, 4, generator=generator)
    context = dit.embed_context(torch.randn(1, 7, dit.config.text_dim, generator=generator))
    timestep = torch.tensor([812.0])
    with torch.no_grad():
        plain = dit([latent], [0.0], timestep, context)
        shared = dit.embed_time(timestep)
        assert torch.equal(dit([latent], [0.0], timestep, context, embedded_time=shared), plain)
        assert torch.equal(dit([latent], [0.0], shared, context), plain)
        with pytest.raises(BerniniError, match="embedded_time"):
            dit([latent], [0.0], torch.tensor([812.0]), context, embedded_time=shared)
