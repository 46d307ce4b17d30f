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
                            "text_encoder", "vae", "compile"],
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


# ------------------------------------------------------------------------------------------ templates, example media
EXAMPLES = ROOT / "workflows" / "inputs"
COMFY_SHIPS = {"example.png"}  # ComfyUI's own input/ folder holds this sample image (and no video)
OPEN_VIEW = (1280, 640)  # bounds the view docs/dev/gen_workflows.py frames (VIEW: a 1280x720 page less the frontend chrome)
TITLE_BAR = 30  # LiteGraph's NODE_TITLE_HEIGHT: the title bar is drawn above a node's pos


def _media_of(name):
    files = [n["widgets_values"][0] for n in ui(name)["nodes"] if n["type"] in ("LoadVideo", "LoadImage")]
    api_files = [e["inputs"].get("file") or e["inputs"].get("image") for e in api(name).values()
                 if e["class_type"] in ("LoadVideo", "LoadImage")]
    assert sorted(files) == sorted(api_files)
    return files


@pytest.mark.parametrize("name", NAMES)
def test_template_thumbnail_is_a_small_jpeg_beside_the_workflow(name):
    from PIL import Image

    path = WORKFLOWS / f"{name}.jpg"  # the frontend requests /api/workflow_templates/<pack>/<name>.jpg
    data = path.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"  # JPEG start / end markers
    assert 3_000 < len(data) < 100_000
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and 256 <= image.width <= 1024
        assert 0.5 <= image.height / image.width <= 1.0
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 50  # drawn content, not a blank card


def _card_pixels(jpeg: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("L")


def _mean_difference(a, b):
    from PIL import ImageChops

    histogram = ImageChops.difference(a, b).histogram()
    return sum(level * count for level, count in enumerate(histogram)) / (a.width * a.height)


def test_thumbnails_are_current_readable_and_distinct():
    """One card per workflow, equal to the generator's rendering of today's workflow and its card text (kept in
    extra.bernini_template: the frontend shows only the file name); every card differs from the others."""
    import runpy

    render = runpy.run_path(str(ROOT / "docs" / "dev" / "workflow_thumbnails.py"))["render"]
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(NAMES)
    cards = {}
    for name in NAMES:
        workflow = ui(name)
        card = workflow["extra"]["bernini_template"]
        family = "Bernini-R" if name.startswith("bernini_r_") else "Bernini"
        assert card["title"].startswith(f"{family} {task_of(name)}: ") and len(card["description"]) > 30
        shipped = _card_pixels((WORKFLOWS / f"{name}.jpg").read_bytes())
        assert _mean_difference(shipped, _card_pixels(render(workflow, card["title"], card["description"]))) < 1.0
        assert _mean_difference(shipped, _card_pixels(render(workflow, "x", card["description"]))) > 1.0  # can fail
        cards[name] = shipped
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1:]:
            assert _mean_difference(cards[a], cards[b]) > 0.5, (a, b)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_with_every_node_in_view(name):
    workflow = ui(name)
    ds = workflow["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]

    def on_canvas(node):
        (x, y), (w, h) = node["pos"], node["size"]
        return [((px + ox) * scale, (py + oy) * scale) for px, py in ((x, y - TITLE_BAR), (x + w, y + h))]

    corners = [c for n in workflow["nodes"] for c in on_canvas(n)]
    assert all(0 <= cx <= OPEN_VIEW[0] and 0 <= cy <= OPEN_VIEW[1] for cx, cy in corners), name
    width = max(c[0] for c in corners) - min(c[0] for c in corners)
    height = max(c[1] for c in corners) - min(c[1] for c in corners)
    assert width > 0.8 * OPEN_VIEW[0] or height > 0.8 * OPEN_VIEW[1]  # framed, not just shrunk to a dot
    far = copy.deepcopy(workflow["nodes"][0])
    far["pos"] = [far["pos"][0] + 20_000, far["pos"][1]]
    assert not all(0 <= cx <= OPEN_VIEW[0] for cx, _ in on_canvas(far))  # the check can fail


@pytest.mark.parametrize("name", NAMES)
def test_media_the_workflow_loads_ship_with_the_pack_or_comfyui(name):
    for file in _media_of(name):
        assert file in COMFY_SHIPS or (EXAMPLES / file).is_file(), f"{name}: {file} is in no install"


def test_example_media_are_small_decodable_and_all_used():
    import av
    from PIL import Image

    used = {f for name in NAMES for f in _media_of(name)}
    shipped = {p.name for p in EXAMPLES.iterdir()}
    assert shipped == used - COMFY_SHIPS
    for name in sorted(shipped):
        path = EXAMPLES / name
        assert 1_000 < path.stat().st_size < 300_000, name
        if path.suffix == ".mp4":
            with av.open(str(path)) as container:
                rate = container.streams.video[0].average_rate
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == 81 and rate == 16  # the presets keep all 81 frames at 16 fps
            assert frames[0].shape[0] % 16 == 0 and frames[0].shape[1] % 16 == 0
            assert frames[0].std() > 20 and abs(frames[0].astype(float) - frames[-1]).mean() > 2  # a moving scene
        else:
            with Image.open(path) as image:
                assert image.size[0] >= 256 and image.size[1] >= 256


def test_example_media_ship_in_the_registry_package():
    import fnmatch

    ignored = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for path in EXAMPLES.iterdir():
        relative = path.relative_to(ROOT).as_posix()
        for pattern in ignored:
            prefix = pattern.rstrip("/")
            assert not (relative.startswith(prefix + "/") or fnmatch.fnmatch(relative, pattern)
                        or fnmatch.fnmatch(path.name, pattern)), (relative, pattern)


class _FolderPaths:
    """Stand-in for ComfyUI's folder_paths module: only what the copy reads."""

    def __init__(self, input_dir):
        self.input_dir = input_dir

    def get_input_directory(self):
        return str(self.input_dir)


def test_examples_are_copied_into_input_once_and_never_overwrite(tmp_path, monkeypatch, caplog):
    from bernini_core import example_inputs

    input_dir = tmp_path / "input"
    input_dir.mkdir()
    (input_dir / "bernini_source.mp4").write_bytes(b"the user's own clip")
    (input_dir / "example.png").write_bytes(b"comfy's")
    monkeypatch.setitem(sys.modules, "folder_paths", _FolderPaths(input_dir))
    with caplog.at_level("INFO", logger="bernini"):
        copied = example_inputs.install_into_comfyui()
    assert copied == ["bernini_reference.mp4", "bernini_reference.png"]
    assert (input_dir / "bernini_source.mp4").read_bytes() == b"the user's own clip"  # never overwritten
    assert (input_dir / "example.png").read_bytes() == b"comfy's"
    for name in copied:
        assert (input_dir / name).read_bytes() == (EXAMPLES / name).read_bytes()
    assert sorted(p.name for p in input_dir.iterdir()) == sorted(
        ["bernini_source.mp4", "example.png", *copied])  # no temporary file left behind
    assert len([r for r in caplog.records if "example inputs" in r.getMessage()]) == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="bernini"):
        assert example_inputs.install_into_comfyui() == []  # idempotent, and silent the second time
    assert not caplog.records


def test_example_copy_into_an_unusable_input_folder_is_one_warning(tmp_path, monkeypatch, caplog):
    from bernini_core import example_inputs

    blocked = tmp_path / "input"
    blocked.write_text("a file where the folder should be")
    monkeypatch.setitem(sys.modules, "folder_paths", _FolderPaths(blocked))
    with caplog.at_level("WARNING", logger="bernini"):
        assert example_inputs.install_into_comfyui() == []
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "Load Video" in caplog.text
    assert blocked.read_text() == "a file where the folder should be"


def test_example_copy_without_comfyui_does_nothing(monkeypatch):
    from bernini_core import example_inputs

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert example_inputs.install_into_comfyui() == []
    assert "folder_paths" not in sys.modules


def test_the_pack_copies_the_examples_when_comfyui_loads_it(tmp_path, monkeypatch):
    input_dir = tmp_path / "input"
    monkeypatch.setitem(sys.modules, "folder_paths", _FolderPaths(input_dir))
    name = "custom_nodes_x_ComfyUI-Bernini-examples"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key)
    assert sorted(p.name for p in input_dir.iterdir()) == sorted(p.name for p in EXAMPLES.iterdir())


# ------------------------------------------------------------------------------------------ readable presets
PRESETS_JSON = ROOT / "web" / "bernini_presets.json"


def test_preset_table_for_the_frontend_is_the_engines():
    from bernini_core import tasks

    table = load(PRESETS_JSON)
    assert table["models"] == {"Bernini-Diffusers": "v1", "Bernini-Diffusers-v2": "v2",
                               "Bernini-R-Diffusers": "renderer", "Bernini-R-1.3B-Diffusers": "renderer",
                               "single files": "renderer"}
    assert set(table["models"]) == STATIC_MODELS["BerniniLoadRenderer"]
    assert set(table["presets"]) == {"renderer", "v1", "v2"}
    for family, presets in table["presets"].items():
        assert set(presets) == set(tasks.TASK_NAMES)
        for task, shown in presets.items():
            engine = tasks.renderer_preset(task) if family == "renderer" else tasks.bernini_preset(task, family)
            assert shown and all(engine[key] == value for key, value in shown.items()), (family, task)
            planner = {"planning_step", "vit_denoising_step", "vit_txt_cfg", "vit_img_cfg"}
            assert (planner <= set(shown)) == (family != "renderer")
    assert table["fast"] == tasks.FAST_OVERRIDES and table["no_guidance"] == tasks.NO_GUIDANCE
    assert table["no_guidance_ignores"] == list(tasks.NO_GUIDANCE_IGNORES)
    # spot values typed from docs/official_behaviour.md §5.2 / §5.3, independent of the code above
    assert table["presets"]["v2"]["rv2v"]["omega_txt"] == 5.5 and table["presets"]["v2"]["t2v"]["planning_step"] == 50
    assert table["presets"]["renderer"]["r2v"]["guidance_mode"] == "r2v_apg"
    assert table["presets"]["renderer"]["t2v"]["num_inference_steps"] == 40


NODE_CHECK = """
import { readFileSync } from "node:fs";
import * as hints from "./preset_hints_core.mjs";
const table = JSON.parse(readFileSync(process.argv[2], "utf8"));
const cases = JSON.parse(process.argv[3]);
console.log(JSON.stringify({
  widgets: hints.SENTINEL_WIDGETS,
  hints: cases.hints.map((c) => hints.presetHints(table, c)),
  families: cases.models.map((m) => hints.familyOfModel(table, m)),
  sentinel: cases.sentinel.map(([s, v]) => hints.isSentinel(s, v)),
}));
"""


@pytest.fixture(scope="module")
def preset_hints(tmp_path_factory):
    """Runs web/js/preset_hints_core.js under Node on the cases given; the answers as Python data."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the frontend extension's preset logic is not run")
    folder = tmp_path_factory.mktemp("preset_hints")
    shutil.copy(ROOT / "web" / "js" / "preset_hints_core.js", folder / "preset_hints_core.mjs")
    (folder / "check.mjs").write_text(NODE_CHECK)

    def run(cases):
        done = subprocess.run([node, str(folder / "check.mjs"), str(PRESETS_JSON), json.dumps(cases)],
                              capture_output=True, text=True, timeout=60, cwd=folder)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return run


def test_preset_hints_name_what_the_preset_uses(preset_hints, defs):
    sample, plan, sources = "BerniniSampleVideo", "BerniniPlanSemantics", "BerniniSources"
    out = preset_hints({
        "hints": [{"nodeType": sample, "family": "v2", "task": "rv2v"},
                  {"nodeType": sample, "family": "renderer", "task": "v2v", "preset": "fast"},
                  {"nodeType": sample, "family": "renderer", "task": "r2v"},
                  {"nodeType": plan, "family": "v2", "task": "t2v"},
                  {"nodeType": plan, "family": "renderer", "task": "t2v"},
                  {"nodeType": sources, "family": "v1", "task": "v2v"},
                  {"nodeType": sample, "family": None, "task": "v2v"}],
        "models": ["Bernini-R-Diffusers", "Bernini-Diffusers", "my-Bernini-Diffusers-v2-copy", "Bernini-R-fp8",
                   "wan_something"],
        "sentinel": [["auto", "auto"], ["auto", "v2v"], [0, 0.0], [0, 40], [-1, -1.0], [-1, -0.5], [-1, 0]],
    })
    v2_rv2v, fast, r2v, plan_t2v, plan_r, sources_v2v, unknown = out["hints"]
    assert v2_rv2v == {"guidance_mode": "preset rv2v_wapg", "steps": "preset 40", "flow_shift": "preset 5",
                       "omega_vid": "preset 1.75", "omega_img": "preset 4", "omega_txt": "preset 5.5",
                       "omega_tgt": "preset 1.5", "omega_scale": "preset 0.75", "sampler": "preset unipc"}
    assert fast["steps"] == "preset 4" and fast["sampler"] == "preset distill"
    assert fast["guidance_mode"] == "preset none"
    assert all(fast[w] == "unused" for w in ("omega_vid", "omega_img", "omega_txt", "omega_tgt", "omega_scale"))
    assert r2v["omega_img"] == "preset 4.5" and r2v["guidance_mode"] == "preset r2v_apg"
    assert r2v["omega_tgt"] == "unused"
    assert plan_t2v == {"planning_steps": "preset 50", "vit_denoising_steps": "preset 1", "vit_txt_cfg": "preset 1.2",
                        "vit_img_cfg": "preset 1"}
    assert plan_r == {} and unknown == {}
    assert sources_v2v == {"width": "preset: the source's", "height": "preset: the source's", "frames": "preset 81",
                           "max_image_size": "preset 848"}
    assert out["families"] == ["renderer", "v1", "v2", "renderer", None]
    assert out["sentinel"] == [True, False, True, False, True, True, False]
    # every widget the extension annotates exists on its node, and its default is the sentinel
    for node_type, widgets in out["widgets"].items():
        inputs = defs[node_type]["input"]["required"]
        for widget, (sentinel, _) in widgets.items():
            assert inputs[widget][1]["default"] == sentinel, (node_type, widget)


EXTENSION_CHECK = """
import { readFileSync } from "node:fs";
const table = JSON.parse(readFileSync(process.argv[2], "utf8"));
let tick = null;
globalThis.setInterval = (fn) => { tick = fn; };
globalThis.fetch = async () => ({ json: async () => table });
const { registered } = await import("../../scripts/app.js");
await import("./js/preset_hints.js");
class Node {
  constructor(type, widgets, inputs = {}) {
    this.type = type; this.links = inputs; this.dirty = 0;
    this.widgets = Object.entries(widgets).map(([name, value]) => ({ name, value }));
    this.inputs = Object.keys(inputs).map((name) => ({ name }));
  }
  findInputSlot(name) { return this.inputs.findIndex((i) => i.name === name); }
  getInputNode(slot) { return this.links[this.inputs[slot].name] ?? null; }
  setDirtyCanvas() { this.dirty += 1; }
}
const loader = new Node("BerniniLoadRenderer", { model: "Bernini-R-Diffusers" });
const encode = new Node("BerniniEncodePrompt", { task: "r2v" });
const lora = new Node("BerniniApplyLora", {}, { renderer: loader });
const sample = new Node("BerniniSampleVideo", { guidance_mode: "auto", steps: 0, omega_img: -1, omega_txt: 3.0,
  preset: "official",
  seed: 42 }, { renderer: lora, conditioning: encode });
registered.app.graph = { _nodes: [loader, encode, lora, sample] };
await registered.extension.setup();
const labels = () => Object.fromEntries(sample.widgets.map((w) => [w.name, w.label ?? null]));
tick();
const first = labels();
sample.widgets.find((w) => w.name === "steps").value = 30;   // an explicit number: the label goes back
encode.widgets[0].value = "t2v";                               // the task changes upstream
tick();
console.log(JSON.stringify({ first, second: labels(), dirty: sample.dirty, name: registered.extension.name }));
"""
APP_STUB = """
export const registered = {};
export const app = { registerExtension(extension) { registered.extension = extension; } };
registered.app = app;
"""


def test_preset_hints_extension_labels_the_connected_nodes(tmp_path):
    """web/js/preset_hints.js against a stand-in graph: the renderer found through a LoRA node, the task through the
    prompt node, labels set on sentinel widgets only and restored when a number is typed or the task changes."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the frontend extension is not run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "package.json").write_text('{"type": "module"}')
    ext = tmp_path / "extensions" / "ComfyUI-Bernini"  # ComfyUI serves web/ at /extensions/<pack>/
    (ext / "js").mkdir(parents=True)
    (ext / "package.json").write_text('{"type": "module"}')
    for name in ("preset_hints.js", "preset_hints_core.js"):
        shutil.copy(ROOT / "web" / "js" / name, ext / "js" / name)
    (ext / "check.js").write_text(EXTENSION_CHECK)  # extensions/<pack>/js/preset_hints.js imports ../../../scripts/app.js
    done = subprocess.run([node, str(ext / "check.js"), str(PRESETS_JSON)], capture_output=True, text=True,
                          timeout=60, cwd=ext)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["first"] == {"guidance_mode": "guidance_mode (preset r2v_apg)", "steps": "steps (preset 40)",
                            "omega_img": "omega_img (preset 4.5)", "omega_txt": None, "preset": None, "seed": None}
    assert out["second"] == {"guidance_mode": "guidance_mode (preset t2v_apg)", "steps": None,
                             "omega_img": "omega_img (preset 4.5)", "omega_txt": None, "preset": None, "seed": None}
    assert out["dirty"] >= 2 and out["name"] == "Bernini.PresetHints"
