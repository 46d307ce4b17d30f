"""The example workflows: checked as ComfyUI's frontend and validate_prompt would check them, converted to API
prompts as graphToPrompt does, and executed on the tiny checkpoints with our node classes.

References: the node contract (widget order, typed by hand below), the native node definitions in
tests/fixtures/native_object_info.json (cited per entry), the frontend rules described in tests/workflow_tools.py.
"""

import copy
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflow_tools as wt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS, API = ROOT / "workflows", ROOT / "workflows" / "api"
FULL_TASKS = ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")
R_TASKS = ("t2v", "v2v", "rv2v", "r2v")
FAST_LORA = "bernini_r_v2v_fast_lora"  # Bernini-R v2v with the lightx2v 4-step distill LoRA pair, preset fast
MULTI_GPU = ("bernini_r_t2v_multigpu", "bernini_v2v_multigpu")  # Bernini Multi-GPU -> the renderer's parallel input
ENHANCED = "bernini_v2v_enhanced"  # Enhance Bernini Prompt (local backend: the planner's Qwen2.5-VL) -> Encode's prompt
NAMES = [f"bernini_{t}" for t in FULL_TASKS] + [f"bernini_r_{t}" for t in R_TASKS] + [FAST_LORA, *MULTI_GPU, ENHANCED]
DISTILL_LORAS = ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                 "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors")


def task_of(name: str) -> str:
    base = re.sub(r"^bernini_(r_)?", "", name)
    return base.removesuffix("_fast_lora").removesuffix("_multigpu").removesuffix("_enhanced")
VIDEO_SOURCE_TASKS = ("v2v", "mv2v", "rv2v", "ads2v")

# Widget order of the node contract (docs/node_contract.md §2), control_after_generate after each seed, and of the
# native nodes (upload button after the file combo: extensions/core/uploadImage.ts).
CONTRACT_WIDGETS = {
    "BerniniLoadPlanner": ["model", "weight_dtype", "download"],
    "BerniniLoadRenderer": ["model", "weight_dtype", "attention", "download", "high_noise_model", "low_noise_model",
                            "text_encoder", "vae"],
    "BerniniEncodePrompt": ["task", "prompt", "negative_prompt"],
    "BerniniSources": ["width", "height", "frames", "fps", "max_image_size", "video_fps", "reference_video_fps"],
    "BerniniPlanSemantics": ["planning_steps", "vit_denoising_steps", "vit_txt_cfg", "vit_img_cfg", "seed",
                             "control_after_generate"],
    "BerniniSampleVideo": ["guidance_mode", "steps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_tgt",
                           "omega_scale", "seed", "control_after_generate", "expert_boundary", "preset", "sampler"],
    "BerniniDecodeVAE": ["tiled", "tile_size", "tile_overlap"],
    "BerniniApplyLora": ["lora_name", "strength_high", "strength_low"],
    "BerniniMultiGPU": ["gpus", "ulysses", "cfg_parallel", "fsdp", "ray_address", "device", "timeout"],
    "BerniniEnhancePrompt": ["task", "prompt", "backend", "max_new_tokens", "sampling", "sampling_seed",
                             "endpoint_model"],
    "LoadImage": ["image", "upload"], "LoadVideo": ["file", "upload"], "GetVideoComponents": [],
    "CreateVideo": ["fps"], "SaveVideo": ["filename_prefix", "format", "codec"], "SaveImage": ["filename_prefix"],
}
# Values the contract lists statically (the model combos also list whatever is found in models/bernini).
STATIC_MODELS = {"BerniniLoadPlanner": {"Bernini-Diffusers", "Bernini-Diffusers-v2"},
                 "BerniniLoadRenderer": {"single files", "Bernini-Diffusers", "Bernini-Diffusers-v2",
                                         "Bernini-R-Diffusers", "Bernini-R-1.3B-Diffusers"}}


@pytest.fixture(scope="module")
def pack():
    name = "custom_nodes_x_ComfyUI-Bernini"  # loaded the way ComfyUI loads a pack (tests/test_package.py)
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key)


@pytest.fixture(scope="module")
def defs(pack):
    """/object_info as a ComfyUI with the distill LoRA pair in models/loras lists it (outside ComfyUI our file lists
    are empty)."""
    definitions = wt.all_definitions(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)
    lora_name = definitions["BerniniApplyLora"]["input"]["required"]["lora_name"]
    assert lora_name[0] == []
    lora_name[0].extend(DISTILL_LORAS)
    return definitions


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ui(name):
    return load(WORKFLOWS / f"{name}.json")


def api(name):
    return load(API / f"{name}.json")


def nodes_of(workflow, node_type):
    return [n for n in workflow["nodes"] if n["type"] == node_type]


# ------------------------------------------------------------------------------------------ files and fixture
def test_the_workflows_and_their_api_twins_exist_flat():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(NAMES)  # ComfyUI lists top-level *.json only
    assert sorted(p.stem for p in API.glob("*.json")) == sorted(NAMES)
    assert not [p for p in WORKFLOWS.rglob("*.json") if p.parent not in (WORKFLOWS, API)]


def test_native_fixture_is_object_info_with_sources():
    data = load(wt.FIXTURE)
    natives = wt.native_definitions()
    assert set(natives) == {"LoadImage", "SaveImage", "LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo"}
    for name, entry in natives.items():
        assert entry["name"] == name and entry["_source"] and "@" in entry["_source"]
        assert set(entry["input_order"]) == set(entry["input"])
        for section, names in entry["input_order"].items():
            assert names == list(entry["input"][section])
        assert len(entry["output"]) == len(entry["output_is_list"]) == len(entry["output_name"])
        assert set(entry.get("_validate_inputs", ())) <= set(entry["input"]["required"])
    assert natives["SaveVideo"]["output_node"] and natives["SaveImage"]["output_node"]
    assert natives["GetVideoComponents"]["output"] == ["IMAGE", "AUDIO", "FLOAT"]
    assert "_about" in data


def test_widget_order_follows_the_contract_and_the_frontend(defs):
    for node_type, expected in CONTRACT_WIDGETS.items():
        assert [w.name for w in wt.frontend_widgets(defs[node_type])] == expected, node_type


def test_our_definitions_are_object_info(pack, defs):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        entry = defs[name]
        assert entry["output"] == list(cls.RETURN_TYPES) and len(entry["output_name"]) == len(entry["output"])
        signature = inspect.signature(getattr(cls, cls.FUNCTION))
        assert [i.name for i in wt.input_defs(entry)] == [p for p in signature.parameters if p != "self"], name


# ------------------------------------------------------------------------------------------ UI workflows
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_passes_the_frontend_and_validate_prompt_checks(defs, name):
    assert wt.check_ui_workflow(ui(name), defs) == []


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_wired_for_its_task(name):
    workflow = ui(name)
    full = not name.startswith("bernini_r_")
    task = task_of(name)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def feeders(node, input_name):
        entry = next(i for i in node["inputs"] if i["name"] == input_name)
        return None if entry["link"] is None else by_id[links[entry["link"]][1]]

    (encode,) = nodes_of(workflow, "BerniniEncodePrompt")
    assert encode["widgets_values"][0] == task and encode["widgets_values"][1].strip()
    (sample,), (sources,) = nodes_of(workflow, "BerniniSampleVideo"), nodes_of(workflow, "BerniniSources")
    assert feeders(sample, "conditioning")["type"] == ("BerniniPlanSemantics" if full else "BerniniEncodePrompt")
    renderer = feeders(sample, "renderer")
    if name == FAST_LORA:  # loader -> LoRA on the high-noise expert -> LoRA on the low-noise expert -> Sample (fast)
        low = renderer
        high = feeders(low, "renderer")
        assert low["type"] == high["type"] == "BerniniApplyLora"
        assert feeders(high, "renderer")["type"] == "BerniniLoadRenderer"
        assert high["widgets_values"] == [DISTILL_LORAS[0], 1.0, 0.0]
        assert low["widgets_values"] == [DISTILL_LORAS[1], 0.0, 1.0]
        assert sample["widgets_values"][-2:] == ["fast", "auto"]
    else:
        assert renderer["type"] == "BerniniLoadRenderer" and sample["widgets_values"][-2:] == ["official", "auto"]
    assert len(nodes_of(workflow, "BerniniLoadPlanner")) == (1 if full else 0)
    model = "Bernini-Diffusers-v2" if full else "Bernini-R-Diffusers"
    for loader in nodes_of(workflow, "BerniniLoadPlanner") + nodes_of(workflow, "BerniniLoadRenderer"):
        assert loader["widgets_values"][0] == model and model in STATIC_MODELS[loader["type"]]
    (loader,) = nodes_of(workflow, "BerniniLoadRenderer")
    parallel = feeders(loader, "parallel")
    assert (parallel is not None) == (name in MULTI_GPU)
    if parallel is not None:
        assert parallel["type"] == "BerniniMultiGPU" and parallel["widgets_values"][0] == "2"
    video_fed = feeders(sources, "source_video")
    assert (video_fed is not None) == (task in VIDEO_SOURCE_TASKS)
    # the prompt widget turned into an input (only then listed in inputs), fed by Enhance Bernini Prompt
    enhancer = feeders(encode, "prompt") if any(i["name"] == "prompt" for i in encode["inputs"]) else None
    assert (enhancer is not None) == (name == ENHANCED) == bool(nodes_of(workflow, "BerniniEnhancePrompt"))
    if enhancer is not None:  # the planner's Qwen2.5-VL, shown the frames Sources gets
        assert enhancer["type"] == "BerniniEnhancePrompt"
        assert enhancer["widgets_values"][:3] == [task, encode["widgets_values"][1], "local"]
        assert feeders(enhancer, "planner")["type"] == "BerniniLoadPlanner"
        assert feeders(enhancer, "source_video") is video_fed
    if video_fed is not None:  # frames and frame rate of the same GetVideoComponents
        assert video_fed["type"] == "GetVideoComponents" and feeders(sources, "video_fps") is video_fed
        assert feeders(video_fed, "video")["type"] == "LoadVideo"
    assert (feeders(sources, "reference_video") is not None) == (task == "ads2v")
    if task == "ads2v":  # the reference clip's own frame rate, from its own GetVideoComponents
        assert feeders(sources, "reference_video_fps") is feeders(sources, "reference_video")
    assert (feeders(sources, "source_image") is not None) == (task == "i2i")
    assert (feeders(sources, "reference_images") is not None) == (task in ("rv2v", "r2v"))
    save_type = "SaveImage" if task in ("t2i", "i2i") else "SaveVideo"
    (save,) = nodes_of(workflow, save_type)
    if save_type == "SaveVideo":
        create = feeders(save, "video")
        assert create["type"] == "CreateVideo" and feeders(create, "images")["type"] == "BerniniDecodeVAE"
        assert create["widgets_values"] == [sources["widgets_values"][3]]  # plays at the Sources fps (16)
    else:
        assert feeders(save, "images")["type"] == "BerniniDecodeVAE"


@pytest.mark.parametrize("name", NAMES)
def test_note_says_what_to_download_and_connect(name):
    workflow = ui(name)
    (note,) = nodes_of(workflow, "Note")
    text = note["widgets_values"][0]
    model = "Bernini-R-Diffusers" if name.startswith("bernini_r_") else "Bernini-Diffusers-v2"
    assert f"hf download ByteDance/{model} --local-dir ComfyUI/models/bernini/{model}" in text
    for loader in nodes_of(workflow, "LoadVideo") + nodes_of(workflow, "LoadImage"):
        assert loader["widgets_values"][0] in text and ("placeholder" in text or "ships" in text)
    assert "preset" in text
    if name == FAST_LORA:
        assert all(f"  {lora}" in text for lora in DISTILL_LORAS) and "models/loras" in text
    if name in MULTI_GPU:
        assert "pip install" in text and "ray start --head" in text and "Free model" in text
    if name == ENHANCED:  # where the endpoint settings live, and that no key goes into the workflow
        assert "BERNINI_PE_API_KEY" in text and "Never put a key" in text and "backend local" in text


ROLE_IDS = {"3": "BerniniEncodePrompt", "4": "BerniniSources", "5": "BerniniPlanSemantics",
            "6": "BerniniSampleVideo", "9": ("SaveVideo", "SaveImage"), "10": "LoadVideo", "12": "LoadVideo",
            "14": "LoadImage", "15": "LoadImage", "20": "BerniniEnhancePrompt"}


@pytest.mark.parametrize("name", NAMES)
def test_api_node_ids_are_the_same_role_in_every_workflow(name):
    """README.md tells API users to address nodes by these ids."""
    prompt = api(name)
    for node_id, class_type in ROLE_IDS.items():
        if node_id in prompt:
            assert prompt[node_id]["class_type"] in (class_type if isinstance(class_type, tuple) else (class_type,))
    assert {"3", "4", "6", "9"} <= set(prompt)
    assert ("10" in prompt) == (task_of(name) in VIDEO_SOURCE_TASKS)


def test_readme_section_lists_every_workflow_and_the_downloads():
    text = (WORKFLOWS.parent / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"`{name}.json`" in text
    for model in ("Bernini-Diffusers-v2", "Bernini-Diffusers", "Bernini-R-Diffusers"):
        assert f"hf download ByteDance/{model} " in text and f"ComfyUI/models/bernini/{model}" in text
    for node_id in ("10", "3", "6"):
        assert f'prompt["{node_id}"]' in text


def test_nodes_do_not_overlap():
    for name in NAMES:
        boxes = [(n["id"], n["pos"], n["size"]) for n in ui(name)["nodes"]]
        for i, (a, pa, sa) in enumerate(boxes):
            for b, pb, sb in boxes[i + 1:]:
                apart = (pa[0] + sa[0] <= pb[0] or pb[0] + sb[0] <= pa[0] or pa[1] + sa[1] + 30 <= pb[1]
                         or pb[1] + sb[1] + 30 <= pa[1])
                assert apart, f"{name}: nodes {a} and {b} overlap"


# ------------------------------------------------------------------------------------------ each check can fail
def _first(workflow, node_type):
    return nodes_of(workflow, node_type)[0]


def _break_combo(w):
    _first(w, "BerniniLoadRenderer")["widgets_values"][1] = "int4"


def _break_range(w):
    _first(w, "BerniniSources")["widgets_values"][0] = 5000


def _break_count(w):
    _first(w, "BerniniSampleVideo")["widgets_values"].pop(9)  # the control_after_generate value


def _break_control(w):
    _first(w, "BerniniPlanSemantics")["widgets_values"][5] = "sometimes"


def _break_upload(w):
    _first(w, "LoadVideo")["widgets_values"] = ["bernini_source.mp4"]


def _break_type(w):
    _first(w, "BerniniSources")["widgets_values"][3] = 16.5  # fps is an INT


def _break_link_type(w):
    link = next(link for link in w["links"] if link[5] == "BERNINI_VAE")
    link[5] = "VAE"


def _break_link_slot(w):
    link = next(link for link in w["links"] if link[5] == "BERNINI_SOURCES")
    link[4] += 1


def _break_dangling(w):
    w["links"][0][1] = 999


def _break_required(w):
    entry = next(i for i in _first(w, "BerniniSampleVideo")["inputs"] if i["name"] == "renderer")
    w["links"] = [link for link in w["links"] if link[0] != entry["link"]]
    entry["link"] = None


def _break_unknown(w):
    _first(w, "BerniniDecodeVAE")["type"] = "BerniniDecodeVAEX"


def _break_last_id(w):
    w["last_link_id"] = 1


def _break_order(w):
    _first(w, "SaveVideo")["order"] = 1


def _break_note(w):
    _first(w, "Note")["widgets_values"] = []


def _break_input_layout(w):
    node = _first(w, "BerniniSources")
    node["inputs"] = [i for i in node["inputs"] if i["name"] != "reference_video"]


@pytest.mark.parametrize("breaker", [_break_combo, _break_range, _break_count, _break_control, _break_upload,
                                     _break_type, _break_link_type, _break_link_slot, _break_dangling,
                                     _break_required, _break_unknown, _break_last_id, _break_order, _break_note,
                                     _break_input_layout])
def test_ui_checker_catches_a_broken_workflow(defs, breaker):
    workflow = ui("bernini_v2v")
    breaker(workflow)
    assert wt.check_ui_workflow(workflow, defs), breaker.__name__


def _api_missing(p):
    del p[_id(p, "BerniniSampleVideo")]["inputs"]["steps"]


def _api_link_type(p):
    p[_id(p, "BerniniSampleVideo")]["inputs"]["sources"] = [_id(p, "BerniniEncodePrompt"), 0]


def _api_arity(p):
    p[_id(p, "BerniniSampleVideo")]["inputs"]["renderer"] = [_id(p, "BerniniLoadRenderer")]


def _api_bad_slot(p):
    p[_id(p, "BerniniSampleVideo")]["inputs"]["renderer"] = [_id(p, "BerniniLoadRenderer"), 7]


def _api_unknown(p):
    p[_id(p, "CreateVideo")]["class_type"] = "CreateVideoX"


def _api_no_output(p):
    del p[_id(p, "SaveVideo")]


def _api_combo(p):
    p[_id(p, "BerniniSampleVideo")]["inputs"]["guidance_mode"] = "cfg"


def _api_max(p):
    p[_id(p, "BerniniPlanSemantics")]["inputs"]["vit_txt_cfg"] = 11.0


def _api_cycle(p):
    p[_id(p, "BerniniEncodePrompt")]["inputs"]["text_encoder"] = [_id(p, "BerniniDecodeVAE"), 0]


def _id(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


@pytest.mark.parametrize("breaker", [_api_missing, _api_link_type, _api_arity, _api_bad_slot, _api_unknown,
                                     _api_no_output, _api_combo, _api_max, _api_cycle])
def test_api_checker_catches_a_broken_prompt(defs, breaker):
    prompt = api("bernini_v2v")
    assert wt.check_api_prompt(prompt, defs) == []
    breaker(prompt)
    assert wt.check_api_prompt(prompt, defs), breaker.__name__


# ------------------------------------------------------------------------------------------ UI -> API
def test_converter_follows_graph_to_prompt_on_a_hand_written_graph(defs):
    """A small graph whose API prompt is written out by hand from executionUtil.ts graphToPrompt."""
    workflow = {
        "last_node_id": 5, "last_link_id": 3, "version": 0.4, "links": [
            [1, 1, 0, 2, 0, "VIDEO"], [2, 2, 0, 3, 0, "IMAGE"], [3, 2, 2, 3, 1, "FLOAT"]],
        "nodes": [
            {"id": 1, "type": "LoadVideo", "order": 0, "mode": 0, "title": "Clip", "inputs": [],
             "outputs": [{"name": "VIDEO", "type": "VIDEO", "links": [1]}], "widgets_values": ["a.mp4", "image"]},
            {"id": 2, "type": "GetVideoComponents", "order": 1, "mode": 0, "inputs": [
                {"name": "video", "type": "VIDEO", "link": 1}], "outputs": [], "widgets_values": []},
            {"id": 3, "type": "CreateVideo", "order": 2, "mode": 0, "inputs": [
                {"name": "images", "type": "IMAGE", "link": 2},
                {"name": "fps", "type": "FLOAT", "widget": {"name": "fps"}, "link": 3}],
             "outputs": [], "widgets_values": [30.0]},
            {"id": 4, "type": "Note", "order": 3, "mode": 0, "widgets_values": ["hello"]},
            {"id": 5, "type": "BerniniPlanSemantics", "order": 4, "mode": 4, "inputs": [], "outputs": [],
             "widgets_values": [0, 0, -1.0, -1.0, 7, "fixed"]},
        ]}
    assert wt.ui_to_api(workflow, defs) == {
        "1": {"inputs": {"file": "a.mp4"}, "class_type": "LoadVideo", "_meta": {"title": "Clip"}},
        "2": {"inputs": {"video": ["1", 0]}, "class_type": "GetVideoComponents",
              "_meta": {"title": defs["GetVideoComponents"]["display_name"]}},
        "3": {"inputs": {"fps": ["2", 2], "images": ["2", 0]}, "class_type": "CreateVideo",
              "_meta": {"title": "Create Video"}},
    }


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_exactly_to_its_api_twin(defs, name):
    assert wt.ui_to_api(ui(name), defs) == api(name)


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_passes_validate_prompt(defs, name):
    prompt = api(name)
    assert wt.check_api_prompt(prompt, defs) == []
    for entry in prompt.values():  # control_after_generate and upload never reach the server
        assert "control_after_generate" not in entry["inputs"] and "upload" not in entry["inputs"]
        assert entry["_meta"]["title"]


# ------------------------------------------------------------------------------------------ execution
MEDIA_H = MEDIA_W = 32


def _frames(n, seed):
    return torch.rand(n, MEDIA_H, MEDIA_W, 3, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Test doubles for the native file-IO nodes (same input names as their definitions); saves are captured."""

    def __init__(self):
        self.saved, self.loaded = [], []

    def classes(self):
        rec = self

        class LoadImage:
            FUNCTION = "load_image"

            def load_image(self, image):
                rec.loaded.append(image)
                return _frames(1, len(rec.loaded)), torch.zeros(1, MEDIA_H, MEDIA_W)

        class LoadVideo:
            FUNCTION = "execute"

            def execute(self, file):
                rec.loaded.append(file)
                return ({"file": file, "seed": len(rec.loaded)},)

        class GetVideoComponents:
            FUNCTION = "execute"

            def execute(self, video):
                return _frames(9, video["seed"]), None, 24.0  # 9 frames at 24 fps: resampled to 16 fps by Sources

        class CreateVideo:
            FUNCTION = "execute"

            def execute(self, images, fps, audio=None):
                return ({"images": images, "fps": fps, "audio": audio},)

        class SaveVideo:
            FUNCTION = "execute"

            def execute(self, video, filename_prefix, format, codec):
                rec.saved.append(("video", video["images"], video["fps"], filename_prefix))
                return {"ui": {}}

        class SaveImage:
            FUNCTION = "save_images"

            def save_images(self, images, filename_prefix):
                rec.saved.append(("image", images, None, filename_prefix))
                return {"ui": {}, "result": (images,)}

        return {c.__name__: c for c in (LoadImage, LoadVideo, GetVideoComponents, CreateVideo, SaveVideo, SaveImage)}


TINY = {"BerniniSources": {"width": 32, "height": 32, "frames": 5, "max_image_size": 48},
        "BerniniPlanSemantics": {"planning_steps": 2, "vit_denoising_steps": 1},
        "BerniniSampleVideo": {"steps": 2}, "BerniniEnhancePrompt": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def tiny_models(tiny_bernini_v2_dir, tiny_renderer_dir):
    return {"Bernini-Diffusers-v2": Path(tiny_bernini_v2_dir), "Bernini-R-Diffusers": Path(tiny_renderer_dir)}


@pytest.fixture(scope="module")
def loader_cache():
    return {}


def _cached(cls, cache):
    """Loader nodes keep their outputs across prompts while their inputs do not change, as ComfyUI's cache does."""

    class Cached(cls):
        def _run(self, **kwargs):
            key = (cls.__name__, json.dumps(kwargs, sort_keys=True))
            if key not in cache:
                cache[key] = getattr(cls(), cls.FUNCTION)(**kwargs)
            return cache[key]

    Cached.FUNCTION = "_run"
    return Cached


# FAST_LORA needs ComfyUI (below); the multi-GPU graphs need Ray (tests/integration/test_ray_pool.py)
@pytest.mark.parametrize("name", [n for n in NAMES if n != FAST_LORA and n not in MULTI_GPU])
def test_api_workflow_runs_on_the_tiny_checkpoints(pack, defs, tiny_models, loader_cache, monkeypatch, name):
    from bernini_core import comfy_bridge

    def model_path(kind, model):
        assert kind == "bernini", kind
        return tiny_models[model]

    monkeypatch.setattr(comfy_bridge, "list_models", lambda kind: list(tiny_models) if kind == "bernini" else [])
    monkeypatch.setattr(comfy_bridge, "model_path", model_path)
    prompt = copy.deepcopy(api(name))
    for entry in prompt.values():  # tiny sizes and steps, through the API inputs
        entry["inputs"].update(TINY.get(entry["class_type"], {}))
    assert wt.check_api_prompt(prompt, defs) == []
    recorder = Recorder()
    classes = dict(pack.NODE_CLASS_MAPPINGS)
    for loader in ("BerniniLoadPlanner", "BerniniLoadRenderer"):
        classes[loader] = _cached(classes[loader], loader_cache)
    classes.update(recorder.classes())
    outputs = wt.execute_prompt(prompt, classes)
    if name == ENHANCED:  # the planner's Qwen2.5-VL wrote the prompt Encode Prompt encoded
        assert isinstance(outputs["20"][0], str) and prompt["3"]["inputs"]["prompt"] == ["20", 0]

    task = task_of(name)
    (kind, frames, fps, prefix), = recorder.saved
    expected_frames = 1 if task in ("t2i", "i2i") else 5
    assert kind == ("image" if task in ("t2i", "i2i") else "video")
    assert frames.dtype == torch.float32 and tuple(frames.shape) == (expected_frames, MEDIA_H, MEDIA_W, 3)
    assert torch.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1
    assert fps in (None, 16.0) and prefix.startswith(("Bernini_", "video/Bernini_"))
    media = [e["inputs"].get("file") or e["inputs"].get("image") for e in prompt.values()
             if e["class_type"] in ("LoadVideo", "LoadImage")]
    assert sorted(recorder.loaded) == sorted(media)


def _write_distill_pair(folder, dit):
    """Stand-ins for lightx2v's pair, written for the tiny experts in ComfyUI's layout (low-rank pairs with alpha,
    full-weight diffs of a bias and a modulation), under the names the workflow picks."""
    from lora_files import low_rank, write

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(DISTILL_LORAS):
        state, _ = low_rank(dit, "comfy", ("q", "ffn", "head"), rank=4, alpha=4.0, seed=seed)
        state["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.full((dit.blocks[0].attn1.to_q.out_features,),
                                                                          0.05)
        state["diffusion_model.blocks.1.modulation.diff"] = torch.full(dit.blocks[1].scale_shift_table.shape, 0.05)
        write(folder / name, state)


def test_fast_lora_workflow_runs_in_comfyui(pack, defs, comfy, tiny_renderer_dir, monkeypatch):
    """bernini_r_v2v_fast_lora under the ComfyUI stand-in (tests/comfy_stub.py patches weights as ComfyUI's
    ModelPatcher): the LoRA pair reaches the experts as patches, preset fast runs 4 single-pass steps (high, high,
    low, low), and the LoRAs change the video (against the same graph with both strengths at 0)."""
    from bernini_core import comfy_bridge
    from bernini_core.renderer.transformer import BerniniDiT

    real_model_path = comfy_bridge.model_path
    monkeypatch.setattr(comfy_bridge, "model_path", lambda kind, name: Path(tiny_renderer_dir) if kind == "bernini"
                        else real_model_path(kind, name))
    monkeypatch.setattr(comfy_bridge, "list_models", lambda kind: ["Bernini-R-Diffusers"] if kind == "bernini"
                        else list(DISTILL_LORAS) if kind == "loras" else [])
    forwards = []
    original_forward = BerniniDiT.forward

    def counting_forward(self, *args, **kwargs):
        forwards.append((id(self), float(args[2].reshape(-1)[0])))
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(BerniniDiT, "forward", counting_forward)

    def run(strengths=None):
        prompt = copy.deepcopy(api(FAST_LORA))
        for entry in prompt.values():  # tiny sizes; the preset's 4 steps stay
            entry["inputs"].update({k: v for k, v in TINY.get(entry["class_type"], {}).items() if k != "steps"})
            if entry["class_type"] == "BerniniApplyLora" and strengths is not None:
                entry["inputs"].update(strength_high=strengths, strength_low=strengths)
        assert wt.check_api_prompt(prompt, defs) == []
        recorder = Recorder()
        classes = {**pack.NODE_CLASS_MAPPINGS, **recorder.classes()}
        forwards.clear()
        wt.execute_prompt(prompt, classes)
        ((kind, frames, fps, _),) = recorder.saved
        assert kind == "video" and tuple(frames.shape) == (5, MEDIA_H, MEDIA_W, 3) and fps == 16.0
        return frames

    from bernini_core.loaders import load_renderer

    experts = load_renderer(Path(tiny_renderer_dir), dtype=torch.float32, parts="experts")
    _write_distill_pair(comfy.models / "loras", experts.dit_high)
    with_loras = run()
    assert [round(t, 2) for _, t in forwards] == [1000.0, 937.5, 833.33, 625.0]  # one pass per step
    used = [i for i, _ in forwards]
    assert used[0] == used[1] != used[2] == used[3]  # switched after step 2
    assert torch.isfinite(with_loras).all()
    off = run(strengths=0.0)
    assert not torch.allclose(with_loras, off)
