"""Offline stand-ins for what ComfyUI's frontend and server do with a workflow (test-only).

ComfyUI cannot be installed here, so the checks are re-implemented from its sources:
- node definitions in the /object_info format: server.py `node_info` for V1 classes (our nodes), and a fixture
  of the native nodes (tests/fixtures/native_object_info.json, each entry citing its source);
- widgets: the frontend creates one widget per non-socket input in definition order (required, then optional,
  each in input_order); an INT named seed/noise_seed or flagged control_after_generate gets one extra
  "control_after_generate" widget right after it (useIntWidget.ts); a COMBO flagged image_upload /
  video_upload / animated_image_upload gets an extra "upload" button widget at the end of the required inputs
  (extensions/core/uploadImage.ts, useImageUploadWidget.ts, value "image"). LGraphNode.serialize stores every
  widget value positionally in widgets_values (it skips only widgets whose own `serialize` is false, which
  neither extra widget sets), while graphToPrompt (utils/executionUtil.ts) skips widgets whose
  `options.serialize` is false: both extras are in widgets_values and absent from the API prompt;
- saved node inputs follow the legacy layout (compressWidgetInputSlots, utils/litegraphUtil.ts): every socket
  input in definition order, plus a widget input only when a link feeds it;
- the UI -> API conversion is graphToPrompt: virtual nodes (Note, ...) and muted/bypassed nodes dropped,
  widget values by name, links as [str(origin_id), origin_slot], _meta.title = the node's title;
- API validation is execution.py validate_prompt / validate_inputs: known class_type, an output node, required
  inputs present, links [id, slot] to an existing output of the same type, value types, min/max and combo
  membership (skipped for inputs the node validates itself: '_validate_inputs' in the fixture), no cycles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "native_object_info.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")  # frontend-only; Reroute / PrimitiveNode are not supported here
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


# ------------------------------------------------------------------------------------------ definitions
def native_definitions() -> dict:
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


def object_info(name: str, cls, display_name: str | None) -> dict:
    """The /object_info entry of a V1 node class, as server.py node_info builds it."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {section: list(values) for section, values in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }


def all_definitions(mappings: dict, display_names: dict) -> dict:
    defs = native_definitions()
    defs.update({name: object_info(name, cls, display_names.get(name)) for name, cls in mappings.items()})
    return defs


@dataclass(frozen=True)
class InputDef:
    name: str
    type: str  # "COMBO" for option lists
    options: dict
    required: bool
    choices: tuple | None  # COMBO options

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput")


def _input_def(name: str, spec, required: bool) -> InputDef:
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, (list, tuple)):
        return InputDef(name, "COMBO", options, required, tuple(kind))
    if kind == "COMBO":
        return InputDef(name, "COMBO", options, required, tuple(options.get("options", ())))
    return InputDef(name, kind, options, required, None)


def input_defs(defn: dict) -> list[InputDef]:
    """Required then optional inputs, each in input_order (hidden inputs are not part of a graph)."""
    order = defn.get("input_order", {})
    result = []
    for section in ("required", "optional"):
        specs = defn["input"].get(section, {})
        for name in order.get(section, list(specs)):
            result.append(_input_def(name, specs[name], section == "required"))
    return result


@dataclass(frozen=True)
class Widget:
    name: str
    kind: str  # "value" | "control" (control_after_generate) | "upload"
    input: InputDef | None


def frontend_widgets(defn: dict) -> list[Widget]:
    """The widgets the frontend creates for a node definition, in widgets_values order."""
    widgets, upload, first_optional = [], False, None
    for inp in input_defs(defn):
        if not inp.is_widget:
            continue
        if not inp.required and first_optional is None:
            first_optional = len(widgets)
        widgets.append(Widget(inp.name, "value", inp))
        flagged = inp.options.get("control_after_generate")
        if flagged or (flagged is None and inp.type == "INT" and inp.name in ("seed", "noise_seed")):
            widgets.append(Widget("control_after_generate", "control", None))
        upload = upload or (inp.type == "COMBO" and any(inp.options.get(flag) for flag in UPLOAD_FLAGS))
    if upload:  # the upload extension appends an "upload" input to the required inputs
        widgets.insert(len(widgets) if first_optional is None else first_optional, Widget("upload", "upload", None))
    return widgets


def output_types(defn: dict) -> list[str]:
    return list(defn.get("output", []))


def types_match(received: str, expected: str) -> bool:
    """comfy_execution/validation.py validate_node_input: equal, '*' on either side, or comma unions."""
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(","))) if "," in received + expected else False


def check_value(inp: InputDef, value: Any, *, skip_combo: bool = False) -> str | None:
    """Type, min/max and combo membership of a constant input value (None when valid)."""
    if inp.type == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{inp.name}: {value!r} is not an INT"
    elif inp.type == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{inp.name}: {value!r} is not a FLOAT"
    elif inp.type == "STRING":
        if not isinstance(value, str):
            return f"{inp.name}: {value!r} is not a STRING"
    elif inp.type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{inp.name}: {value!r} is not a BOOLEAN"
    elif inp.type == "COMBO":
        if skip_combo:  # the node checks it itself (a file name the user uploads)
            return None if isinstance(value, str) and value.strip() else f"{inp.name}: {value!r} is not a file name"
        if value not in inp.choices:
            return f"{inp.name}: {value!r} not in {list(inp.choices)}"
        return None
    else:
        return f"{inp.name}: a {inp.type} socket cannot hold the constant {value!r}"
    if inp.type in ("INT", "FLOAT"):
        if "min" in inp.options and value < inp.options["min"]:
            return f"{inp.name}: {value} smaller than min {inp.options['min']}"
        if "max" in inp.options and value > inp.options["max"]:
            return f"{inp.name}: {value} bigger than max {inp.options['max']}"
    return None


# ------------------------------------------------------------------------------------------ UI workflow
def _node_label(node: dict) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


def _check_widgets(node: dict, defn: dict, linked: set) -> list[str]:
    label, errors = _node_label(node), []
    widgets = frontend_widgets(defn)
    values = node.get("widgets_values", [])
    if not isinstance(values, list) or len(values) != len(widgets):
        return [f"{label}: widgets_values has {len(values) if isinstance(values, list) else values!r} values, "
                f"the frontend makes {len(widgets)} widgets {[w.name for w in widgets]}"]
    skip = set(defn.get("_validate_inputs", ()))
    for widget, value in zip(widgets, values):
        if widget.kind == "control":
            if value not in CONTROL_VALUES:
                errors.append(f"{label}: control_after_generate value {value!r} not in {CONTROL_VALUES}")
        elif widget.kind == "upload":
            if value != "image":
                errors.append(f"{label}: upload widget value {value!r} (the frontend stores 'image')")
        elif widget.name not in linked:
            problem = check_value(widget.input, value, skip_combo=widget.name in skip)
            if problem:
                errors.append(f"{label}: {problem}")
    return errors


def _check_slots(node: dict, defn: dict, links: dict) -> tuple[list[str], set]:
    """Saved inputs/outputs against the definition and the links table; returns (errors, linked widget names)."""
    label, errors, linked_widgets = _node_label(node), [], set()
    defs = {inp.name: inp for inp in input_defs(defn)}
    expected_names = [inp.name for inp in input_defs(defn)
                      if not inp.is_widget or any(s.get("name") == inp.name and s.get("link") is not None
                                                  for s in node.get("inputs", []))]
    saved = node.get("inputs", [])
    if [s.get("name") for s in saved] != expected_names:
        errors.append(f"{label}: inputs {[s.get('name') for s in saved]} != {expected_names} "
                      "(every socket in definition order, plus linked widget inputs)")
    for slot, entry in enumerate(saved):
        inp = defs.get(entry.get("name"))
        if inp is None:
            continue
        if entry.get("type") != inp.type:
            errors.append(f"{label}: input {inp.name} has type {entry.get('type')!r}, definition {inp.type!r}")
        if inp.is_widget:
            if entry.get("widget") != {"name": inp.name}:
                errors.append(f"{label}: widget input {inp.name} lacks widget: {{name: {inp.name!r}}}")
            linked_widgets.add(inp.name)
        link_id = entry.get("link")
        if link_id is None:
            if inp.required:
                errors.append(f"{label}: required input {inp.name} is not connected")
            continue
        link = links.get(link_id)
        if link is None or link[3] != node["id"] or link[4] != slot:
            errors.append(f"{label}: input {inp.name} names link {link_id}, which does not end at slot {slot}")
    outs = output_types(defn)
    saved_outs = node.get("outputs", [])
    if [o.get("type") for o in saved_outs] != outs:
        errors.append(f"{label}: output types {[o.get('type') for o in saved_outs]} != definition {outs}")
    for slot, out in enumerate(saved_outs):
        if slot < len(defn.get("output_name", [])) and out.get("name") != defn["output_name"][slot]:
            errors.append(f"{label}: output {slot} named {out.get('name')!r}, definition {defn['output_name'][slot]!r}")
        for link_id in out.get("links") or []:
            link = links.get(link_id)
            if link is None or link[1] != node["id"] or link[2] != slot:
                errors.append(f"{label}: output {slot} lists link {link_id}, which does not start there")
    return errors, linked_widgets


def check_ui_workflow(workflow: dict, defs: dict) -> list[str]:
    """The checks the frontend's schema + graph loading and validate_prompt would make; [] when valid."""
    errors = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            errors.append(f"workflow lacks {key!r}")
    if errors:
        return errors
    if workflow["version"] != 0.4:
        errors.append(f"version {workflow['version']!r}, expected 0.4")
    nodes = workflow["nodes"]
    ids = [n.get("id") for n in nodes]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        errors.append(f"node ids must be unique integers: {ids}")
    if ids and workflow["last_node_id"] < max(ids):
        errors.append(f"last_node_id {workflow['last_node_id']} < largest node id {max(ids)}")
    links = {}
    for link in workflow["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            errors.append(f"link {link!r} is not [id, origin_id, origin_slot, target_id, target_slot, type]")
            continue
        if link[0] in links:
            errors.append(f"link id {link[0]} used twice")
        links[link[0]] = link
    if links and workflow["last_link_id"] < max(links):
        errors.append(f"last_link_id {workflow['last_link_id']} < largest link id {max(links)}")
    by_id = {n.get("id"): n for n in nodes}
    for node in nodes:
        label = _node_label(node)
        for key, kind in (("pos", list), ("size", list), ("flags", dict), ("order", int), ("mode", int),
                          ("properties", dict)):
            if not isinstance(node.get(key), kind) or (kind is list and len(node[key]) != 2):
                errors.append(f"{label}: field {key!r} missing or malformed")
        if node.get("mode", 0) != 0:
            errors.append(f"{label}: mode {node.get('mode')} (muted/bypassed nodes do not belong in an example)")
        if node.get("type") in VIRTUAL_NODES:
            values = node.get("widgets_values")
            if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) and values[0]):
                errors.append(f"{label}: a Note holds its text as widgets_values [text]")
            continue
        defn = defs.get(node.get("type"))
        if defn is None:
            errors.append(f"{label}: unknown node type (not in object_info)")
            continue
        slot_errors, linked_widgets = _check_slots(node, defn, links)
        errors += slot_errors + _check_widgets(node, defn, linked_widgets)
    for link_id, (_, origin, oslot, target, tslot, ltype) in links.items():
        src, dst = by_id.get(origin), by_id.get(target)
        if src is None or dst is None:
            errors.append(f"link {link_id}: endpoint node {origin if src is None else target} does not exist")
            continue
        src_def, dst_def = defs.get(src.get("type")), defs.get(dst.get("type"))
        if src_def is None or dst_def is None:
            continue
        outs = output_types(src_def)
        if not 0 <= oslot < len(outs):
            errors.append(f"link {link_id}: origin slot {oslot} out of range for {src['type']}")
            continue
        if not 0 <= tslot < len(dst.get("inputs", [])):
            errors.append(f"link {link_id}: target slot {tslot} out of range for {dst['type']}")
            continue
        target_input = dst["inputs"][tslot]
        if target_input.get("link") != link_id:
            errors.append(f"link {link_id}: target input {target_input.get('name')} holds link "
                          f"{target_input.get('link')}")
        if link_id not in (src.get("outputs", [])[oslot].get("links") or []):
            errors.append(f"link {link_id}: not listed on output {oslot} of node {origin}")
        target_def = {inp.name: inp for inp in input_defs(dst_def)}.get(target_input.get("name"))
        expected = target_def.type if target_def else None
        if not (ltype == outs[oslot] and expected and types_match(outs[oslot], expected)):
            errors.append(f"link {link_id}: type {ltype!r}, origin output {outs[oslot]!r}, target input {expected!r}")
        if src.get("order", 0) >= dst.get("order", 0):
            errors.append(f"link {link_id}: node {origin} (order {src.get('order')}) must run before node {target} "
                          f"(order {dst.get('order')})")
    return errors


# ------------------------------------------------------------------------------------------ UI -> API
def ui_to_api(workflow: dict, defs: dict) -> dict:
    """graphToPrompt: the API prompt the frontend queues for a UI workflow."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n.get("order", 0)):
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        defn = defs[node["type"]]
        inputs = {}
        for widget, value in zip(frontend_widgets(defn), node.get("widgets_values", [])):
            if widget.kind == "value":
                inputs[widget.name] = {"__value__": value} if isinstance(value, list) else value
        for entry in node.get("inputs", []):
            link = links.get(entry.get("link"))
            if link is not None:
                inputs[entry["name"]] = [str(link[1]), int(link[2])]
        title = node.get("title") or defn.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    for entry in prompt.values():  # inputs fed by dropped nodes disappear
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


# ------------------------------------------------------------------------------------------ API validation
def execution_order(prompt: dict) -> list[str]:
    """Node ids in dependency order; raises ValueError on a cycle or a dangling link."""
    order, state = [], {}

    def visit(node_id: str, path: tuple):
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "active":
            raise ValueError(f"dependency cycle through nodes {path + (node_id,)}")
        if node_id not in prompt:
            raise ValueError(f"link to missing node {node_id}")
        state[node_id] = "active"
        for value in prompt[node_id]["inputs"].values():
            if _is_link(value):
                visit(value[0], path + (node_id,))
        state[node_id] = "done"
        order.append(node_id)

    for node_id in prompt:
        visit(node_id, ())
    return order


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def check_api_prompt(prompt: dict, defs: dict) -> list[str]:
    """validate_prompt: [] when the server would queue the prompt."""
    errors = []
    if not any(defs.get(e.get("class_type"), {}).get("output_node") for e in prompt.values()):
        errors.append("prompt has no output node")
    for node_id, entry in prompt.items():
        defn = defs.get(entry.get("class_type"))
        if defn is None:
            errors.append(f"node {node_id}: unknown class_type {entry.get('class_type')!r}")
            continue
        label, skip = f"node {node_id} ({entry['class_type']})", set(defn.get("_validate_inputs", ()))
        known = {inp.name: inp for inp in input_defs(defn)}
        for name in entry["inputs"]:
            if name not in known:
                errors.append(f"{label}: input {name!r} is not in the definition")
        for inp in known.values():
            if inp.name not in entry["inputs"]:
                if inp.required:
                    errors.append(f"{label}: required input {inp.name!r} missing")
                continue
            value = entry["inputs"][inp.name]
            if isinstance(value, list):
                if not _is_link(value):
                    errors.append(f"{label}: {inp.name} = {value!r} is not a [node_id, slot] link")
                    continue
                origin = prompt.get(value[0])
                origin_def = defs.get(origin.get("class_type")) if origin else None
                outs = output_types(origin_def) if origin_def else []
                if not 0 <= value[1] < len(outs):
                    errors.append(f"{label}: {inp.name} links to a missing output {value}")
                elif not types_match(outs[value[1]], inp.type):
                    errors.append(f"{label}: {inp.name} expects {inp.type}, receives {outs[value[1]]}")
            elif not inp.is_widget:
                errors.append(f"{label}: socket input {inp.name} needs a link, got {value!r}")
            else:
                problem = check_value(inp, value, skip_combo=inp.name in skip)
                if problem:
                    errors.append(f"{label}: {problem}")
    try:
        execution_order(prompt)
    except ValueError as exc:
        errors.append(str(exc))
    return errors


# ------------------------------------------------------------------------------------------ execution
def execute_prompt(prompt: dict, classes: dict[str, Any]) -> dict:
    """Run an API prompt the way the executor does for V1 classes: dependency order, FUNCTION called with the
    constant and linked inputs by name; returns {node_id: output tuple}."""
    outputs = {}
    for node_id in execution_order(prompt):
        entry = prompt[node_id]
        kwargs = {name: outputs[value[0]][value[1]] if _is_link(value) else value
                  for name, value in entry["inputs"].items()}
        cls = classes[entry["class_type"]]
        result = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(result, dict):  # {"ui": ..., "result": (...)}
            result = result.get("result", ())
        outputs[node_id] = tuple(result or ())
    return outputs
