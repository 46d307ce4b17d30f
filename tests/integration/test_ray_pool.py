"""Bernini Multi-GPU: the node chain with its experts on a Ray pool of CPU workers (gloo) inside the ComfyUI stand-in
(tests/comfy_stub.py: ModelPatchers, progress bars, interrupts, unload_all_models as /free does), against the same
chain in one process. One Ray runtime for the module (started here, on this machine, no network)."""

import copy
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray")

from bernini_core import comfy_bridge  # noqa: E402
from bernini_core.errors import BerniniError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red fox trots through fresh snow"
SEED, STEPS = 5, 3


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def comfy_world(ray_runtime, tmp_path_factory, tiny_renderer_dir, tiny_bernini_v2_dir):
    """The ComfyUI stand-in for the whole module, its model folders pointed at the tiny checkpoints."""
    import comfy_stub

    modules, rec = comfy_stub.build(tmp_path_factory.mktemp("comfy") / "models")
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    folders = {"Bernini-R-Diffusers": Path(tiny_renderer_dir), "Bernini-Diffusers-v2": Path(tiny_bernini_v2_dir)}
    patch = pytest.MonkeyPatch()
    patch.setattr(comfy_bridge, "model_path", lambda kind, name: folders[name])
    patch.setattr(comfy_bridge, "list_models", lambda kind: list(folders) if kind == "bernini" else [])
    try:
        yield rec, modules
    finally:
        patch.undo()
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def pack(comfy_world):
    import importlib.util

    name = "custom_nodes_x_ComfyUI-Bernini_ray"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield SimpleNamespace(classes=dict(module.NODE_CLASS_MAPPINGS),
                          **{k: cls() for k, cls in module.NODE_CLASS_MAPPINGS.items()})
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        sys.modules.pop(key)


def load(pack, model, parallel=None, compile=False):
    return pack.BerniniLoadRenderer.load(model, "fp32", "auto", "never", parallel=parallel, compile=compile)


def multi_gpu(pack, gpus="2", ulysses=0, cfg=1):
    return pack.BerniniMultiGPU.configure(gpus, ulysses, cfg, False, "", "cpu", 120)[0]


def chain(pack, loaded, task="t2v", planner=None, video=None):
    renderer, text_encoder, vae = loaded
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, task, PROMPT, "")
    extra = {} if video is None else {"source_video": video, "video_fps": 16.0}
    (sources,) = pack.BerniniSources.prepare(cond, vae, 32, 32, 5, 16, 48, **extra)
    if planner is not None:
        (cond,) = pack.BerniniPlanSemantics.plan(planner, cond, sources, 2, 1, -1.0, -1.0, SEED)
    (latent,) = pack.BerniniSampleVideo.sample(renderer, cond, sources, "auto", STEPS, 0.0, -1.0, -1.0, -1.0, -1.0,
                                               -1.0, SEED, -1.0)
    return latent["samples"]


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference_r(pack):
    return chain(pack, load(pack, "Bernini-R-Diffusers"))


def test_ulysses_and_arm_groups_equal_one_process(pack, comfy_world, reference_r):
    rec, _ = comfy_world
    for ulysses, cfg in ((2, 1), (1, 2)):
        loaded = load(pack, "Bernini-R-Diffusers", multi_gpu(pack, ulysses=ulysses, cfg=cfg))
        pool = loaded[0].pool
        assert pool.layout.ulysses == ulysses and pool.layout.cfg == cfg and len(pool.pids()) == 2
        assert loaded[0].pipeline.experts is None  # the experts live in the workers only
        bars = len(rec.bars)
        got = chain(pack, loaded)
        assert relative(got, reference_r) <= 1e-5, (ulysses, cfg)
        # the progress bar advanced once per denoising step; the preview shows the leader's latest latent (steps
        # that arrive together share one preview)
        sample_bars = [b for b in rec.bars[bars:] if b.total == STEPS]
        assert [(v, t) for v, t, _ in sample_bars[-1].updates] == [(1, 3), (2, 3), (3, 3)]
        assert sample_bars[-1].updates[-1][2] is not None
        pool.shutdown()


def test_compiled_pool_equals_one_process(pack, reference_r, monkeypatch):
    """The loader's compile switch with Bernini Multi-GPU: every rank compiles its experts' blocks (aot_eager here,
    named in the driver and carried by the pool's spec: no C++ compiler needed on the CPU workers)."""
    from bernini_core.acceleration import settings

    monkeypatch.setattr(settings, "DEFAULT_COMPILE_BACKEND", "aot_eager")
    loaded = load(pack, "Bernini-R-Diffusers", multi_gpu(pack, ulysses=2), compile=True)
    pool = loaded[0].pool
    assert pool.spec["compile"] == "aot_eager" and pool.loaded["compiled"]
    assert relative(chain(pack, loaded), reference_r) <= 1e-5
    pool.shutdown()


def test_full_bernini_v2v_on_the_pool_equals_one_process(pack, media_video):
    planner = pack.BerniniLoadPlanner.load("Bernini-Diffusers-v2", "fp32", "never")[0]
    reference = chain(pack, load(pack, "Bernini-Diffusers-v2"), "v2v", planner, media_video)
    first = None
    for ulysses, cfg in ((2, 1), (1, 2)):
        loaded = load(pack, "Bernini-Diffusers-v2", multi_gpu(pack, ulysses=ulysses, cfg=cfg))
        if first is not None:  # new settings: starting their pool ended the previous one (GPUs hold one pool)
            assert not first.running
        first = loaded[0].pool
        got = chain(pack, loaded, "v2v", planner, media_video)
        assert relative(got, reference) <= 1e-5, (ulysses, cfg)
    first.shutdown()


def test_the_pool_ends_with_its_process(tmp_path, tiny_renderer_dir):
    """No orphan workers: a process that started a pool exits, and its workers are gone."""
    import subprocess

    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from bernini_core.parallel.pool import PoolOptions, WorkerPool\n"
              f"pool = WorkerPool(PoolOptions.from_node('2', device='cpu'), {{'kind': 'folder', 'path': "
              f"{str(tiny_renderer_dir)!r}}}, heads=2, dtype='fp32').start()\n"
              "print('PIDS', *pool.pids(), flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pids = [int(p) for p in next(line for line in result.stdout.splitlines() if line.startswith("PIDS")).split()[1:]]
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def media_video():
    return torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(3))


def test_interrupt_kill_and_free(pack, comfy_world, reference_r):
    rec, modules = comfy_world
    loaded = load(pack, "Bernini-R-Diffusers", multi_gpu(pack))
    pool = loaded[0].pool
    renderer, text_encoder, vae = loaded
    (cond,) = pack.BerniniEncodePrompt.encode(text_encoder, "t2v", PROMPT, "")
    (sources,) = pack.BerniniSources.prepare(cond, vae, 32, 32, 5, 16, 48)

    def long_run():  # 200 steps: seconds, so that the driver hears of steps while the workers still run
        return pack.BerniniSampleVideo.sample(renderer, cond, sources, "auto", 200, 0.0, -1.0, -1.0, -1.0, -1.0,
                                              -1.0, SEED, -1.0)

    # ComfyUI's interrupt (raised by its check on the driver mid-sampling) stops the workers at their next step;
    # the pool stays, and the next run is whole
    rec.interrupt_at = rec.interrupt_checks + 5
    with pytest.raises(modules["comfy.model_management"].InterruptProcessingException):
        long_run()
    assert rec.bars[-1].total == 200 and 0 < rec.bars[-1].current < 200
    assert pool.running
    assert relative(chain(pack, loaded), reference_r) <= 1e-5

    # a worker killed mid-run (at the first step the driver hears of): one error naming the rank and host, then a
    # fresh pool renders
    victim = pool.pids()[1]
    runtime = loaded[0].pipeline.runtime
    relay = runtime.progress

    def kill_at_first_step(stage, step, total, latent=None):
        if step == 1:
            os.kill(victim, signal.SIGKILL)
        return relay(stage, step, total, latent=latent)

    runtime.progress = kill_at_first_step
    try:
        with pytest.raises(BerniniError, match=r"rank 1 on \S+ died during sample"):
            long_run()
    finally:
        del runtime.progress
    assert not pool.running
    assert relative(chain(pack, loaded), reference_r) <= 1e-5
    assert pool.running and victim not in pool.pids()

    # ComfyUI's "free models" (/free with unload_models) ends every worker process
    pids = pool.pids()
    modules["comfy.model_management"].unload_all_models()
    assert not pool.running
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)
    assert relative(chain(pack, loaded), reference_r) <= 1e-5  # and the next run starts it again
    pool.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie no longer runs
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


def test_bad_layouts_and_clusters_are_named_before_any_load(pack, monkeypatch):
    from bernini_core.parallel.pool import pool as pool_module

    with pytest.raises(BerniniError, match="ulysses 3 does not divide|does not divide"):
        load(pack, "Bernini-R-Diffusers", pack.BerniniMultiGPU.configure("3", 3, 1, False, "", "cpu", 60)[0])
    with pytest.raises(BerniniError, match="needs 2 GPUs.*has 0"):  # the tiny DiT's 2 heads: ulysses 2 of 4 GPUs
        load(pack, "Bernini-R-Diffusers", pack.BerniniMultiGPU.configure("4", 0, 1, False, "", "cuda", 60)[0])
    with pytest.raises(BerniniError, match="gpus 'two'"):
        pack.BerniniMultiGPU.configure("two", 0, 1, False, "", "cpu", 60)
    # a model path missing on a worker's machine: named with the host, before any weights load
    options = pack.BerniniMultiGPU.configure("2", 0, 1, False, "", "cpu", 60)[0]
    missing = pool_module.WorkerPool(options, {"kind": "folder", "path": "/nowhere/Bernini-R-Diffusers"}, heads=2)
    with pytest.raises(BerniniError, match=r"'/nowhere/Bernini-R-Diffusers' does not exist on \S+ \(rank 0\)"):
        missing.start()
    assert not missing.running
    # an address nobody listens on: one error in seconds (Ray alone retries for minutes)
    with pytest.raises(BerniniError, match="cannot be reached"):
        pool_module._probe("127.0.0.1:9", timeout_s=2)
    with pytest.raises(BerniniError, match="not host:port"):
        pool_module._probe("nonsense")
    monkeypatch.setattr(pool_module, "import_ray", lambda: (_ for _ in ()).throw(BerniniError(pool_module.INSTALL_HINT)))
    with pytest.raises(BerniniError, match="pip install"):
        load(pack, "Bernini-R-Diffusers", multi_gpu(pack))


def test_multigpu_api_workflows_run_through_the_node_classes(pack, comfy_world, reference_r):
    """The shipped multi-GPU API workflows, tiny sizes and device cpu through the API inputs, graph untouched."""
    import json

    import workflow_tools as wt

    for name in ("bernini_r_t2v_multigpu", "bernini_v2v_multigpu"):
        prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        prompt = copy.deepcopy(prompt)
        saved = []
        for entry in prompt.values():
            overrides = {"BerniniSources": {"width": 32, "height": 32, "frames": 5, "max_image_size": 48},
                         "BerniniPlanSemantics": {"planning_steps": 2, "vit_denoising_steps": 1},
                         "BerniniSampleVideo": {"steps": 2}, "BerniniMultiGPU": {"device": "cpu", "gpus": "2"},
                         "BerniniLoadRenderer": {"weight_dtype": "fp32"}, "BerniniLoadPlanner": {"weight_dtype": "fp32"}}
            entry["inputs"].update(overrides.get(entry["class_type"], {}))
        classes = {**pack.classes, **_media_nodes(saved)}
        wt.execute_prompt(prompt, classes)
        ((frames, fps),) = saved
        assert tuple(frames.shape) == (5, 32, 32, 3) and torch.isfinite(frames).all() and fps == 16.0


def _media_nodes(saved):
    class LoadVideo:
        FUNCTION = "execute"

        def execute(self, file):
            return ({"file": file},)

    class GetVideoComponents:
        FUNCTION = "execute"

        def execute(self, video):
            return torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(1)), None, 16.0

    class CreateVideo:
        FUNCTION = "execute"

        def execute(self, images, fps, audio=None):
            return ({"images": images, "fps": fps},)

    class SaveVideo:
        FUNCTION = "execute"

        def execute(self, video, filename_prefix, format, codec):
            saved.append((video["images"], video["fps"]))
            return {"ui": {}}

    return {c.__name__: c for c in (LoadVideo, GetVideoComponents, CreateVideo, SaveVideo)}
