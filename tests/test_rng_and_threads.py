"""No side effects on the caller's random generators, and pipelines called from threads
(docs/official_behaviour.md §7.1; bernini_core/planner/rng.py, pipeline.serialised, Runtime.acquire/release).

Reference: the official protocol transcribed here — seed the process-global generators with ``random.seed``,
``np.random.seed`` and ``torch.manual_seed`` and draw from them (the random module, numpy's legacy global
generator, torch's default CPU generator) — run through the same pipeline code. Every full-Bernini task must give
bit-identical plans and latents with the pipeline's private generators, and leave those generators in the state the
official run leaves the global ones.
"""

import random
import threading

import numpy as np
import pytest
import torch

from bernini_core import BerniniError, BerniniPipeline, pipeline_full
from bernini_core.pipeline import RendererPipeline
from bernini_core.pipeline_full import FullPipeline
from bernini_core.planner.rng import PlannerRng
from bernini_core.runtime import ModelHandle, Runtime

PROMPT = "a small red fox"
SMALL = {"num_frames": 5, "height": 32, "width": 32, "max_image_size": 48, "num_inference_steps": 2,
         "planning_step": 3, "vit_denoising_step": 2}
TASKS = ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")
VIDEO_EDIT_TASKS = ("v2v", "mv2v", "rv2v", "ads2v")  # height/width 0: the source video's size
CONTEXTS = ("wtxt_wvit", "wtxt_wovit", "wotxt_wvit", "wotxt_wovit", "planned_vit")


@pytest.fixture(scope="module")
def pipes(tiny_bernini_v1_dir, tiny_bernini_v2_dir):
    return {version: BerniniPipeline.from_pretrained(folder, device="cpu", dtype="bf16")
            for version, folder in (("v1", tiny_bernini_v1_dir), ("v2", tiny_bernini_v2_dir))}


@pytest.fixture(scope="module")
def renderer(tiny_renderer_dir):
    return BerniniPipeline.from_pretrained(tiny_renderer_dir, device="cpu", dtype="bf16")


def sources_for(task, media_dir):
    video, ref_video = str(media_dir / "source.mp4"), str(media_dir / "reference.mp4")
    refs = [str(media_dir / "ref0.png"), str(media_dir / "ref1.png")]
    return {
        "t2i": {}, "t2v": {},
        "i2i": {"image": refs[0]},
        "v2v": {"video": video}, "mv2v": {"video": video},
        "ads2v": {"video": [video, ref_video]},
        "r2v": {"images": refs},
        "rv2v": {"video": video, "images": refs},
    }[task]


def call_kwargs(task, media_dir, seed):
    size = {"height": 0, "width": 0} if task in VIDEO_EDIT_TASKS else {}
    return {**SMALL, **size, **sources_for(task, media_dir), "seed": seed}


def official_seeding(seed):
    """The official start of ``__call__``: seed the global generators; the planner then draws from them
    (``generator=None`` is torch's default CPU generator, what a bare ``torch.randn`` uses)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return PlannerRng(python=random, numpy=np.random, torch=None)


def global_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def assert_same_states(a, b):
    assert a[0] == b[0], "Python random state"
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:], "numpy state"
    assert torch.equal(a[2], b[2]), "torch CPU state"


def set_caller_states():
    """Some state of the caller's own, not a fresh seed, so a re-seed would show."""
    random.seed(2024), np.random.seed(77), torch.manual_seed(5)
    random.random(), np.random.random(3), torch.rand(3)
    return global_states()


def run_recorded(pipe, monkeypatch, task, kwargs):
    """One call; returns its latents, its planner contexts and the generators it made (none: official seeding)."""
    plans, made = [], []
    plan, from_seed = pipeline_full.plan, PlannerRng.from_seed
    with monkeypatch.context() as patch:
        patch.setattr(pipeline_full, "plan", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
        patch.setattr(PlannerRng, "from_seed", lambda seed: made.append(from_seed(seed)) or made[-1])
        latents = pipe(task, PROMPT, **kwargs).latents
    assert len(plans) == 1
    return latents, plans[0], made


def official_run(pipe, monkeypatch, task, kwargs):
    """The same call under the official protocol; returns its latents, contexts and the global states after it."""
    with monkeypatch.context() as patch:
        patch.setattr(PlannerRng, "from_seed", official_seeding)
        latents, plan, _ = run_recorded(pipe, monkeypatch, task, kwargs)
    return latents, plan, global_states()


# ------------------------------------------------------------------ 1. the official draws, privately
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("task", TASKS)
def test_private_generators_give_the_official_results(pipes, media_dir, monkeypatch, version, task):
    pipe = pipes[version]
    seed = 2**32 - 1 if task == "t2i" else 100 + TASKS.index(task)  # t2i: the top of numpy's seed range
    kwargs = dict(call_kwargs(task, media_dir, seed), num_inference_steps=1)  # the draws are all in planning
    official_latents, official_plan, official_after = official_run(pipe, monkeypatch, task, kwargs)

    caller = set_caller_states()
    latents, plan, made = run_recorded(pipe, monkeypatch, task, kwargs)
    assert_same_states(caller, global_states())  # the caller's generators: neither re-seeded nor advanced

    assert torch.equal(latents, official_latents)
    for name in CONTEXTS:
        assert torch.equal(getattr(plan, name), getattr(official_plan, name)), name
    # every draw, used or not (the Python stream's are all unused): the private generators end where the official
    # run leaves the global ones
    assert len(made) == 1
    rng = made[0]
    assert_same_states((rng.python.getstate(), rng.numpy.get_state(), rng.torch.get_state()), official_after)


def test_seed_range_is_numpys():
    assert PlannerRng.from_seed(0) is not None and PlannerRng.from_seed(2**32 - 1) is not None
    for seed in (-1, 2**32):
        with pytest.raises(BerniniError, match="0..4294967295"):
            PlannerRng.from_seed(seed)


def test_renderer_leaves_the_callers_generators_alone(renderer):
    caller = set_caller_states()
    renderer("t2v", PROMPT, seed=3, **SMALL)
    assert_same_states(caller, global_states())


# ------------------------------------------------------------------ 2. threads
def in_threads(jobs):
    """Run each job (a callable) in its own thread, all released together; re-raise the first error."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(index, job):
        try:
            barrier.wait()
            results[index] = job()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def series(pipe, media_dir, runs):
    return lambda: [pipe(task, PROMPT, **call_kwargs(task, media_dir, seed)).latents for task, seed in runs]


def assert_all_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_two_pipelines_in_two_threads_equal_sequential_runs(pipes, renderer, media_dir):
    # The two full pipelines would interleave their draws on shared global generators; Bernini-R beside them.
    jobs = [series(pipes["v1"], media_dir, [("t2v", 1), ("rv2v", 2)]),
            series(pipes["v2"], media_dir, [("i2i", 3), ("t2v", 1)]),
            series(renderer, media_dir, [("v2v", 4), ("r2v", 5)])]
    expected = [job() for job in jobs]
    assert_all_equal(in_threads(jobs), expected)


def test_one_pipeline_shared_by_two_threads(pipes, renderer, media_dir):
    for pipe in (pipes["v1"], renderer):
        jobs = [series(pipe, media_dir, [("t2v", 6), ("r2v", 7)]), series(pipe, media_dir, [("v2v", 8)])]
        expected = [job() for job in jobs]
        assert_all_equal(in_threads(jobs), expected)


def test_a_call_waits_for_the_pipelines_lock(renderer):
    done = threading.Event()
    with renderer._lock:  # another call in progress
        thread = threading.Thread(target=lambda: (renderer.encode_prompt("t2v", PROMPT), done.set()))
        thread.start()
        assert not done.wait(0.5)  # a stage method queues behind it
    thread.join(timeout=60)
    assert done.is_set()


# ------------------------------------------------------------------ 3. the offload policy with shared models
class _Spy:
    """Where each module is ("device" or "offloaded") as handles move it, and forwards computed while offloaded."""

    def __init__(self, monkeypatch):
        self.place, self.violations, self.offloads = {}, [], 0
        monkeypatch.setattr(ModelHandle, "load", lambda handle, memory_required=0: self.moved(handle, "device"))
        monkeypatch.setattr(ModelHandle, "offload", lambda handle: self.moved(handle, "offloaded"))

    def moved(self, handle, place):
        self.offloads += place == "offloaded"
        self.place[handle.module] = place
        return handle.module

    def watch(self, top):
        def check(_module, _args):
            if self.place.get(top) != "device":
                self.violations.append(type(top).__name__)

        return [sub.register_forward_pre_hook(check) for sub in top.modules()]


def test_runtime_keeps_a_module_another_thread_uses(monkeypatch):
    """Two handles on one module (two pipelines sharing a model): one stage's release must not offload it under
    the other; the last release does."""
    spy = _Spy(monkeypatch)
    runtime = Runtime("cpu")
    runtime.offload = True  # the accelerator policy, observed through the spy
    module = torch.nn.Linear(2, 2)
    first, second = runtime.handle("dit_high", module), runtime.handle("dit_high", module)
    inside, leave = threading.Event(), threading.Event()

    def stage():
        with runtime.use(first):
            inside.set()
            leave.wait(60)

    thread = threading.Thread(target=stage)
    thread.start()
    assert inside.wait(60)
    runtime.acquire(second)  # the denoiser's pattern
    runtime.release(second)
    assert spy.place[module] == "device" and spy.offloads == 0
    leave.set()
    thread.join(60)
    assert spy.place[module] == "offloaded" and spy.offloads == 1
    runtime.release(second)  # a release of a module nobody holds still offloads (the old behaviour)
    assert spy.offloads == 2


def test_pipelines_sharing_models_and_runtime_in_threads(pipes, renderer, media_dir, monkeypatch):
    """Two pipelines over the same models and Runtime with offloading on: equal to sequential runs, and no model
    computes while offloaded."""
    spy = _Spy(monkeypatch)
    for family, pipe, runs in (("full", pipes["v1"], [("v2v", 9)]), ("renderer", renderer, [("rv2v", 10)])):
        runtime = Runtime("cpu")
        runtime.offload = True
        if family == "full":
            pair = [FullPipeline(pipe.components, runtime, pipe.dtype) for _ in range(2)]
            models = [pipe.components.text_encoder.module, pipe.components.vae, pipe.components.dit_high,
                      pipe.components.dit_low, pipe.components.planner]
        else:
            pair = [RendererPipeline(pipe.components, runtime) for _ in range(2)]
            models = [pipe.components.text_encoder.module, pipe.components.vae, pipe.components.dit_high]
            models += [pipe.components.dit_low] if pipe.components.dit_low is not None else []
        hooks = [hook for model in models for hook in spy.watch(model)]
        try:
            jobs = [series(p, media_dir, runs) for p in pair]
            expected = [job() for job in jobs]
            assert_all_equal(in_threads(jobs), expected)
        finally:
            for hook in hooks:
                hook.remove()
        assert spy.offloads > 0 and not spy.violations, (family, spy.violations[:5])
