"""Writes workflows/*.json (UI v0.4) and workflows/api/*.json (API twins) for ComfyUI-Bernini.

Run from the repository root: python docs/dev/gen_workflows.py (development tool; not shipped, see .comfyignore)
The graphs are described once (node, widget values by name, links by input name); the UI file stores widget
values positionally (tests/workflow_tools.frontend_widgets), the API twin stores them by name directly, so a
UI -> API conversion that matches the twin checks the positional layout independently.
"""

import importlib.util
import json
import sys
import uuid
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "docs" / "dev"))
import workflow_thumbnails  # noqa: E402
import workflow_tools as wt  # noqa: E402


def load_pack():
    name = "custom_nodes_x_ComfyUI-Bernini"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PACK = load_pack()
DEFS = wt.all_definitions(PACK.NODE_CLASS_MAPPINGS, PACK.NODE_DISPLAY_NAME_MAPPINGS)

# The same role has the same node id in every workflow (API users can address "3" = the prompt everywhere).
ROLE_IDS = {"BerniniLoadPlanner": 1, "BerniniLoadRenderer": 2, "BerniniEncodePrompt": 3, "BerniniSources": 4,
            "BerniniPlanSemantics": 5, "BerniniSampleVideo": 6, "BerniniDecodeVAE": 7, "CreateVideo": 8,
            "SaveVideo": 9, "SaveImage": 9, "Load Source Video": 10, "Source Video Frames": 11,
            "Load Reference Video": 12, "Reference Video Frames": 13, "Load Image to Edit": 14,
            "Load Reference Image": 14, "Load Reference Image 1": 14, "Load Reference Image 2": 15, "Note": 16,
            "Distill LoRA (high-noise expert)": 17, "Distill LoRA (low-noise expert)": 18, "BerniniMultiGPU": 19,
            "BerniniEnhancePrompt": 20}
# lightx2v's Wan2.2 T2V 4-step distillation LoRA pair, as ComfyUI's own Wan 2.2 templates name them
# (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, split_files/loras/).
DISTILL_LORAS = {"high": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                 "low": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"}
MULTILINE_H, WIDGET_H, SLOT_H, TITLE_H = 96, 26, 22, 30
# The view a workflow file opens on. ComfyUI's frontend 1.49 restores extra.ds when a workflow file is opened (Open /
# drag-drop; LiteGraph: page pixel = (graph + offset) * scale, the canvas filling the page from its top-left corner)
# and fits the view itself for a template. Its chrome floats over the canvas: the tab bar (38 px on top), the side
# toolbar (59 px on the left), the view-mode toggle and the Run bar (down to 94 px), and at the bottom right the
# minimap and zoom controls (64 px up and more). VIEW is what a 1280x720 page (a small laptop's) leaves free, less a
# 16 px margin, as (left, top, right, bottom); a larger page shows the same view with more room right and below.
VIEW = (59 + 16, 94 + 16, 1280 - 16, 720 - 64 - 16)


def view_framing(nodes):
    """extra.ds that shows every node (pos = the body's top-left corner; the title bar is TITLE_H above it) inside
    VIEW: centred across, and at VIEW's top, away from the minimap at the bottom right (the graphs are wide)."""
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE_H for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    left, top, right, bottom = VIEW
    scale = min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), 1.0)
    scale = int(scale * 1000) / 1000  # rounded down: the box only shrinks
    offset = [round((left + right) / (2 * scale) - (x0 + x1) / 2, 1), round(top / scale - y0, 1)]
    return {"scale": scale, "offset": offset}


class Graph:
    def __init__(self, name):
        self.name = name
        self.nodes = []  # dicts: id, type, pos, widgets, title, width
        self.links = []  # (origin_id, origin_slot, target_id, input_name)

    def add(self, type_, pos, widgets=None, title=None, width=340):
        node = {"id": ROLE_IDS[title or type_], "type": type_, "pos": list(pos), "widgets": dict(widgets or {}),
                "title": title, "width": width}
        self.nodes.append(node)
        return node["id"]

    def link(self, origin, output_name, target, input_name):
        names = DEFS[self.node(origin)["type"]]["output_name"]
        self.links.append((origin, names.index(output_name), target, input_name))

    def node(self, node_id):
        return next(n for n in self.nodes if n["id"] == node_id)


def topo_order(graph):
    deps = {n["id"]: {o for o, _, t, _ in graph.links if t == n["id"]} for n in graph.nodes}
    order, done = [], set()
    while len(order) < len(graph.nodes):
        for n in graph.nodes:
            if n["id"] not in done and deps[n["id"]] <= done:
                order.append(n["id"])
                done.add(n["id"])
                break
    return {node_id: i for i, node_id in enumerate(order)}


def widget_value(defn, widget, given):
    if widget.kind == "control":
        return "fixed"
    if widget.kind == "upload":
        return "image"
    if widget.name in given:
        return given[widget.name]
    default = widget.input.options.get("default")
    if default is None:
        default = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(widget.input.type)
        if widget.input.type == "COMBO":
            default = widget.input.choices[0]
    return default


def node_height(defn, n_inputs, widgets):
    h = TITLE_H + SLOT_H * max(n_inputs, len(defn.get("output", [])))
    for w in widgets:
        multiline = w.input is not None and w.input.options.get("multiline")
        h += MULTILINE_H if multiline else WIDGET_H
    if defn["name"] in ("LoadImage", "LoadVideo"):  # room for the preview the frontend draws under the widgets
        h += 220
    if defn["name"] in ("SaveImage", "SaveVideo"):
        h += 320
    return h + 10


def to_ui(graph, note_text, note_pos, note_size):
    order = topo_order(graph)
    link_rows, by_target, by_origin = [], {}, {}
    for i, (origin, oslot, target, input_name) in enumerate(graph.links, start=1):
        by_target[(target, input_name)] = i
        by_origin.setdefault((origin, oslot), []).append(i)
        link_rows.append([i, origin, oslot, target, None, DEFS[graph.node(origin)["type"]]["output"][oslot]])
    nodes = []
    for n in graph.nodes:
        defn = DEFS[n["type"]]
        inputs = []
        for inp in wt.input_defs(defn):
            link_id = by_target.get((n["id"], inp.name))
            if inp.is_widget and link_id is None:
                continue
            entry = {"name": inp.name, "type": inp.type, "link": link_id}
            if inp.is_widget:
                entry["widget"] = {"name": inp.name}
            if link_id is not None:
                link_rows[link_id - 1][4] = len(inputs)
            inputs.append(entry)
        outputs = [{"name": name, "type": typ, "links": by_origin.get((n["id"], slot), [])}
                   for slot, (name, typ) in enumerate(zip(defn["output_name"], defn["output"]))]
        widgets = wt.frontend_widgets(defn)
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"],
                "size": [n["width"], node_height(defn, len(inputs), widgets)], "flags": {},
                "order": order[n["id"]] + 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n["type"]},
                "widgets_values": [widget_value(defn, w, n["widgets"]) for w in widgets]}
        if n["title"]:
            node["title"] = n["title"]
        nodes.append(node)
    note_id = ROLE_IDS["Note"]
    nodes.insert(0, {"id": note_id, "type": "Note", "pos": list(note_pos), "size": list(note_size), "flags": {},
                     "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": "Read me: models, inputs, settings",
                     "properties": {"text": ""}, "widgets_values": [note_text], "color": "#432", "bgcolor": "#653"})
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-bernini/workflows/" + graph.name)),
        "revision": 0, "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(link_rows), "nodes": nodes, "links": link_rows,
        "groups": [], "config": {}, "extra": {"ds": view_framing(nodes)}, "version": 0.4,
    }


def to_api(graph):
    prompt = {}
    for n in sorted(graph.nodes, key=lambda n: n["id"]):  # by id; the frontend emits execution order, which a dict comparison ignores
        defn = DEFS[n["type"]]
        inputs = {}
        for w in wt.frontend_widgets(defn):
            if w.kind == "value":
                inputs[w.name] = widget_value(defn, w, n["widgets"])
        for origin, oslot, target, input_name in graph.links:
            if target == n["id"]:
                inputs[input_name] = [str(origin), oslot]
        prompt[str(n["id"])] = {"inputs": inputs, "class_type": n["type"],
                                "_meta": {"title": n["title"] or defn["display_name"]}}
    return prompt


# ------------------------------------------------------------------------------------------ the tasks
PROMPTS = {
    "t2i": "A red fox sitting in fresh snow at golden hour, soft warm light, detailed fur, shallow depth of field.",
    "i2i": "Turn the photo into a watercolor painting, keeping the composition and the colors of the subject.",
    "t2v": "A red fox trots through a snowy pine forest at sunrise; the camera follows it at ground level as snow "
           "falls gently.",
    "v2v": "Make it snow heavily: cover the ground, the roofs and the trees with fresh snow, keep all the motion "
           "and the camera path unchanged.",
    "mv2v": "Restyle the video as a hand-drawn anime scene with clean outlines and flat colors, keeping the camera "
            "motion and every movement in it.",
    "rv2v": "Replace the red ball in the video with the blue cube shown in the reference image; keep the street, the "
            "motion and the camera path unchanged.",
    "r2v": "The girl from the first reference image plays with the blue cube from the second reference image in a "
           "sunny meadow, the camera slowly circling them.",
    "ads2v": "Add the video on the wall of the white house.",
}
TASK_TITLES = {"t2i": "text to image", "i2i": "image editing", "t2v": "text to video", "v2v": "video editing",
               "mv2v": "motion / style video editing", "rv2v": "video editing with a reference image",
               "r2v": "reference images to video", "ads2v": "insert a reference video into a source video"}
# The pack's example media (workflows/inputs/, drawn by docs/dev/gen_example_media.py), copied into ComfyUI's input/
# at start-up when absent (bernini_core/example_inputs.py); example.png is the sample image ComfyUI itself ships in input/.
SOURCE_VIDEO, REFERENCE_VIDEO = "bernini_source.mp4", "bernini_reference.mp4"
IMAGE_TO_EDIT, REFERENCE_IMAGE, SECOND_REFERENCE = "example.png", "bernini_reference.png", "bernini_reference.png"
FIRST_REFERENCE = "example.png"
EXAMPLE = "the pack's example, which ships in workflows/inputs/ and is copied into ComfyUI/input/ when absent"
COMFY_EXAMPLE = "the sample image ComfyUI ships in input/"
IMAGE_TASKS = ("t2i", "i2i")

Y = 220  # the main row; the planner loader sits above it, media loaders below
X = {"load": 0, "encode": 420, "sources": 860, "plan": 1280, "sample": 1700, "decode": 2120, "save": 2520}


def media_note(task):
    lines = []
    if task in ("v2v", "mv2v", "rv2v", "ads2v"):
        lines.append(f"- 'Load Source Video' ({SOURCE_VIDEO}: {EXAMPLE}, a street with a rolling ball): upload "
                     "the clip to edit. Its frames "
                     "go to source_video and its frame rate to video_fps; Bernini Sources resamples to fps (16) and "
                     "keeps at most `frames` (preset 81, always 4n+1), sized by the source (long edge <= "
                     "max_image_size).")
    if task == "ads2v":
        lines.append(f"- 'Load Reference Video' ({REFERENCE_VIDEO}: {EXAMPLE}, a turning colour wheel): the clip "
                     "to insert; its frames go to reference_video.")
    if task == "i2i":
        lines.append(f"- 'Load Image to Edit' ({IMAGE_TO_EDIT}: {COMFY_EXAMPLE}): choose your image; it goes to "
                     "source_image.")
    if task == "rv2v":
        lines.append(f"- 'Load Reference Image' ({REFERENCE_IMAGE}: {EXAMPLE}, a blue cube): choose the "
                     "reference; it goes to reference_images. More references: reference_image_2..4.")
    if task == "r2v":
        lines.append(f"- 'Load Reference Image 1/2' ({FIRST_REFERENCE}: {COMFY_EXAMPLE}; {SECOND_REFERENCE}: "
                     f"{EXAMPLE}): choose your references (subjects, objects, scenes), in the order the prompt names "
                     "them. "
                     "reference_images takes a batch of same-size images; reference_image_2..4 take any size.")
    if task in ("t2i", "t2v"):
        lines.append("- No media: the size and length come from Bernini Sources (0 = preset: "
                     + ("512x512, 1 frame" if task == "t2i" else "848x480, 81 frames at 16 fps") + ").")
    return lines


def note_text(task, family):
    if family == "full":
        head = (f"Bernini {task} ({TASK_TITLES[task]}) - full Bernini: the Qwen2.5-VL planner plans the target's "
                "semantics, the Wan2.2 renderer draws it.")
        models = ["MODELS: put the official folder in ComfyUI/models/bernini/ (folder name unchanged):",
                  "  hf download ByteDance/Bernini-Diffusers-v2 --local-dir ComfyUI/models/bernini/Bernini-Diffusers-v2",
                  "or set download = 'if missing' on both loaders to fetch it on first run. For v1 download "
                  "ByteDance/Bernini-Diffusers the same way and pick Bernini-Diffusers in BOTH loaders (planner and "
                  "renderer must be the same release)."]
    else:
        head = (f"Bernini-R {task} ({TASK_TITLES[task]}) - the renderer alone: no planner, the prompt conditions "
                "the Wan2.2 renderer directly.")
        models = ["MODELS: put the official folder in ComfyUI/models/bernini/:",
                  "  hf download ByteDance/Bernini-R-Diffusers --local-dir ComfyUI/models/bernini/Bernini-R-Diffusers",
                  "or set download = 'if missing'. ComfyUI single files also work: model = 'single files', then "
                  "high_noise_model / low_noise_model (models/diffusion_models), text_encoder "
                  "(umt5_xxl_*.safetensors in models/text_encoders) and vae (wan_2.1_vae.safetensors in models/vae)."]
    wiring = ["WIRING: Load Renderer gives renderer -> Sample, text_encoder -> Encode Prompt, vae -> Sources and "
              "Decode. Encode Prompt chooses the task; " + ("Plan Semantics takes the planner, the conditioning "
                                                            "and the sources and feeds Sample."
                                                            if family == "full" else
                                                            "its conditioning goes to Sources and Sample.")]
    media = ["INPUTS:"] + media_note(task)
    settings = ["SETTINGS: 0 / -1 / auto on any widget = the official preset of this task for the connected "
                "model (steps, guidance weights, size, frames, planner steps); the widget's label shows the value, "
                "e.g. 'steps (preset 40)'. Seeds are fixed (42) like the "
                "official scripts; set control_after_generate to randomize for variations.",
                "OUTPUT: " + ("ComfyUI/output/Bernini_*.png." if task in IMAGE_TASKS else
                              "ComfyUI/output/video/Bernini_*.mp4. Create Video plays the frames at 16 fps, the "
                              "rate Bernini Sources renders at: change both together.")]
    return "\n".join([head, ""] + models + [""] + wiring + [""] + media + [""] + settings)


def fast_lora_note(task):
    return "\n".join([
        f"Bernini-R {task} ({TASK_TITLES[task]}) in 4 steps - the renderer with lightx2v's Wan2.2 4-step "
        "distillation LoRA pair: one DiT pass per step instead of 40 steps x 2-4 guided passes (about 20-40x "
        "faster). Not an official Bernini setting: quality and faithfulness to the source are below the official "
        "40-step sampling.", "",
        "MODELS: put the official folder in ComfyUI/models/bernini/:",
        "  hf download ByteDance/Bernini-R-Diffusers --local-dir ComfyUI/models/bernini/Bernini-R-Diffusers",
        "and the two LoRA files in ComfyUI/models/loras/ (from Comfy-Org/Wan_2.2_ComfyUI_Repackaged, "
        "split_files/loras/):",
        f"  {DISTILL_LORAS['high']}", f"  {DISTILL_LORAS['low']}",
        "GGUF experts work too: model = 'single files', high_noise_model / low_noise_model = the .gguf files in "
        "models/diffusion_models.", "",
        "WIRING: Load Renderer -> Apply Bernini LoRA (high file, strength_high 1, strength_low 0) -> Apply Bernini "
        "LoRA (low file, strength_high 0, strength_low 1) -> Sample. text_encoder -> Encode Prompt, vae -> Sources "
        "and Decode.", "",
        "INPUTS:"] + media_note(task) + ["",
        "SETTINGS: Sample's preset = fast: guidance none (one pass with every source and the prompt), 4 steps of "
        "lightx2v's distill sampler on timesteps 1000/750/500/250 at shift 5, experts switched after step 2. Any "
        "widget you set still wins; preset = official (and no LoRA nodes) is the release's own sampling. Seeds are "
        "fixed (42).",
        "OUTPUT: ComfyUI/output/video/Bernini_*.mp4 at 16 fps."])


def multigpu_note(task, family):
    base = note_text(task, family).split("\n")
    head = base[0].replace(" - ", " on several GPUs - ", 1)
    extra = ["", "MULTI-GPU: Bernini Multi-GPU -> Load Renderer's parallel input. The DiT experts load on a pool of Ray "
             "workers, one per GPU, which split every denoising step (ulysses: the tokens of each pass; cfg_parallel: "
             "the guidance passes); UMT5, the VAE" + (" and the planner" if family == "full" else "") + " stay in "
             "ComfyUI. Needs Ray in ComfyUI's Python: pip install \"ray>=2.9\".",
             "- gpus: a count (any GPUs of the Ray cluster) or ids of this machine's GPUs (0,1,2,3). ulysses 0 = auto "
             "(a divisor of the 40 heads: 2, 4, 5, 8). fsdp shards each expert over the GPUs when a whole one does not "
             "fit.",
             "- ray_address empty = a Ray runtime on this machine; 'auto' or host:port = a cluster (ray start --head; "
             "ray start --address=HEAD:6379 on the others; the model must be at the same path on every machine).",
             "- The pool stays loaded between runs; 'Free model and node cache' ends it. device cpu = CPU worker "
             "processes, to try the graph without GPUs."]
    return "\n".join([head] + base[1:] + extra)


def enhanced_note(task):
    base = note_text(task, "full").split("\n")
    head = base[0].replace(" - ", " with prompt enhancement - ", 1)
    extra = ["", "PROMPT ENHANCEMENT: Enhance Bernini Prompt rewrites the short prompt as the official --use_pe does, "
             "here with backend local: the planner's own Qwen2.5-VL reads the prompt and three frames of the source "
             "video and writes the detailed English editing prompt (what changes, what stays). Nothing leaves this "
             "machine. Its output feeds Encode Bernini Prompt's prompt input (the text typed in Encode Prompt is not "
             "used while the link is connected); the enhanced text shows on the node.",
             "- backend openai: an OpenAI-compatible endpoint, set only in the environment ComfyUI runs in: "
             "BERNINI_PE_API_KEY (or OPENAI_API_KEY), BERNINI_PE_BASE_URL (or OPENAI_BASE_URL), BERNINI_PE_MODEL. "
             "Never put a key in the workflow.",
             "- sampling off = the same text every run; on = variations from sampling_seed."]
    return "\n".join([head] + base[1:] + extra)


def build(task, family, variant=None):
    x = dict(X)
    if family != "full":  # no planner column: the rest moves left
        for key in ("sample", "decode", "save"):
            x[key] -= x["sample"] - x["plan"]
    name = f"bernini_{task}" if family == "full" else f"bernini_r_{task}"
    name += f"_{variant}" if variant else ""
    model = "Bernini-Diffusers-v2" if family == "full" else "Bernini-R-Diffusers"
    g = Graph(name)
    planner = g.add("BerniniLoadPlanner", (x["load"], 0), {"model": model}) if family == "full" else None
    renderer = g.add("BerniniLoadRenderer", (x["load"], Y), {"model": model})
    if variant == "multigpu":
        parallel = g.add("BerniniMultiGPU", (x["load"], Y - 420 if family != "full" else Y + 420 + 420 * (
            task in ("v2v", "mv2v", "rv2v", "ads2v"))), {"gpus": "2"})
        g.link(parallel, "parallel", renderer, "parallel")
    encode = g.add("BerniniEncodePrompt", (x["encode"], Y), {"task": task, "prompt": PROMPTS[task]}, width=380)
    sources = g.add("BerniniSources", (x["sources"], Y), {"fps": 16})
    g.link(renderer, "text_encoder", encode, "text_encoder")
    g.link(encode, "conditioning", sources, "conditioning")
    g.link(renderer, "vae", sources, "vae")
    media_y = Y + 420
    if task in ("v2v", "mv2v", "rv2v", "ads2v"):
        load = g.add("LoadVideo", (x["load"], media_y), {"file": SOURCE_VIDEO}, title="Load Source Video")
        parts = g.add("GetVideoComponents", (x["encode"], media_y), title="Source Video Frames")
        g.link(load, "VIDEO", parts, "video")
        g.link(parts, "images", sources, "source_video")
        g.link(parts, "fps", sources, "video_fps")
        media_y += 420
    if task == "ads2v":
        load = g.add("LoadVideo", (x["load"], media_y), {"file": REFERENCE_VIDEO}, title="Load Reference Video")
        parts = g.add("GetVideoComponents", (x["encode"], media_y), title="Reference Video Frames")
        g.link(load, "VIDEO", parts, "video")
        g.link(parts, "images", sources, "reference_video")
        g.link(parts, "fps", sources, "reference_video_fps")
    if task == "i2i":
        image = g.add("LoadImage", (x["load"], media_y), {"image": IMAGE_TO_EDIT}, title="Load Image to Edit")
        g.link(image, "IMAGE", sources, "source_image")
    if task == "rv2v":
        image = g.add("LoadImage", (x["load"], media_y), {"image": REFERENCE_IMAGE}, title="Load Reference Image")
        g.link(image, "IMAGE", sources, "reference_images")
    if task == "r2v":
        first = g.add("LoadImage", (x["load"], media_y), {"image": FIRST_REFERENCE}, title="Load Reference Image 1")
        second = g.add("LoadImage", (x["encode"], media_y), {"image": SECOND_REFERENCE},
                       title="Load Reference Image 2")
        g.link(first, "IMAGE", sources, "reference_images")
        g.link(second, "IMAGE", sources, "reference_image_2")
    if variant == "enhanced":  # the planner's Qwen2.5-VL writes the prompt Encode Prompt encodes
        enhance = g.add("BerniniEnhancePrompt", (x["encode"], Y - 460),
                        {"task": task, "prompt": PROMPTS[task], "backend": "local"}, width=380)
        g.link(planner, "planner", enhance, "planner")
        g.link(ROLE_IDS["Source Video Frames"], "images", enhance, "source_video")
        g.link(enhance, "prompt", encode, "prompt")
    conditioning, cond_output = encode, "conditioning"
    if family == "full":
        plan = g.add("BerniniPlanSemantics", (x["plan"], Y))
        g.link(planner, "planner", plan, "planner")
        g.link(encode, "conditioning", plan, "conditioning")
        g.link(sources, "sources", plan, "sources")
        conditioning = plan
    if variant == "fast_lora":
        sample = g.add("BerniniSampleVideo", (x["sample"], Y), {"preset": "fast"})
        high = g.add("BerniniApplyLora", (x["sources"], Y - 420), {"lora_name": DISTILL_LORAS["high"],
                     "strength_high": 1.0, "strength_low": 0.0}, title="Distill LoRA (high-noise expert)", width=420)
        low = g.add("BerniniApplyLora", (x["sources"], Y - 220), {"lora_name": DISTILL_LORAS["low"],
                    "strength_high": 0.0, "strength_low": 1.0}, title="Distill LoRA (low-noise expert)", width=420)
        g.link(renderer, "renderer", high, "renderer")
        g.link(high, "renderer", low, "renderer")
        g.link(low, "renderer", sample, "renderer")
    else:
        sample = g.add("BerniniSampleVideo", (x["sample"], Y))
        g.link(renderer, "renderer", sample, "renderer")
    g.link(conditioning, cond_output, sample, "conditioning")
    g.link(sources, "sources", sample, "sources")
    decode = g.add("BerniniDecodeVAE", (x["decode"], Y))
    g.link(renderer, "vae", decode, "vae")
    g.link(sample, "samples", decode, "samples")
    prefix = "Bernini_" + name.removeprefix("bernini_")
    if task in IMAGE_TASKS:
        save = g.add("SaveImage", (x["save"], Y), {"filename_prefix": prefix}, width=420)
        g.link(decode, "images", save, "images")
    else:
        video = g.add("CreateVideo", (x["decode"], Y + 250), {"fps": 16.0})
        save = g.add("SaveVideo", (x["save"], Y), {"filename_prefix": "video/" + prefix}, width=420)
        g.link(decode, "images", video, "images")
        g.link(video, "VIDEO", save, "video")
    return name, g


CASES = [(t, "full", None) for t in ("t2i", "i2i", "t2v", "v2v", "mv2v", "rv2v", "r2v", "ads2v")] + \
        [(t, "r", None) for t in ("t2v", "v2v", "rv2v", "r2v")] + [("v2v", "r", "fast_lora")] + \
        [("t2v", "r", "multigpu"), ("v2v", "full", "multigpu")] + \
        [("v2v", "full", "enhanced")]


# The template card: ComfyUI's frontend labels a custom-node template with its file name and reads no metadata for
# it, so the readable title and description are drawn on the thumbnail (and head the Note).
TASK_CARDS = {
    "t2i": "Renders one 512x512 image from a prompt.",
    "i2i": "Edits an image by prompt (ComfyUI's example.png).",
    "t2v": "Renders a 5 s 848x480 video from a prompt.",
    "v2v": "Edits a video by prompt (the example street clip).",
    "mv2v": "Restyles a video, keeping its motion (the example street clip).",
    "rv2v": "Edits a video with a reference image (the street clip and a blue cube).",
    "r2v": "Renders a video of the subjects of two reference images.",
    "ads2v": "Inserts a reference video into a source video (the two example clips).",
}
VARIANT_CARDS = {"fast_lora": (" in 4 steps", " With lightx2v's 4-step distill LoRA pair."),
                 "multigpu": (" on several GPUs", " The experts on a Ray pool of GPUs."),
                 "enhanced": (" + prompt enhancer", " The planner's Qwen2.5-VL rewrites the prompt first.")}


def card(task, family, variant):
    """(title, description) of a workflow's template card."""
    suffix, extra = VARIANT_CARDS.get(variant, ("", ""))
    model = "Bernini" if family == "full" else "Bernini-R"
    models = ("Planner + renderer (Bernini-Diffusers-v2)." if family == "full" else
              "Renderer alone (Bernini-R-Diffusers).")
    return f"{model} {task}: {TASK_TITLES[task]}{suffix}", f"{TASK_CARDS[task]}{extra} {models}"


def main():
    out, api = ROOT / "workflows", ROOT / "workflows" / "api"
    api.mkdir(parents=True, exist_ok=True)
    for task, family, variant in CASES:
        name, graph = build(task, family, variant)
        note = {"fast_lora": fast_lora_note(task), "multigpu": multigpu_note(task, family),
                "enhanced": enhanced_note(task)}.get(
            variant, note_text(task, family))
        ui = to_ui(graph, note, (-480, 0), (440, 760))
        title, description = card(task, family, variant)
        ui["extra"]["bernini_template"] = {"title": title, "description": description}  # what the card shows
        (out / f"{name}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / f"{name}.jpg").write_bytes(workflow_thumbnails.render(ui, title, description))
        (api / f"{name}.json").write_text(json.dumps(to_api(graph), indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        print("wrote", name)


if __name__ == "__main__":
    main()
