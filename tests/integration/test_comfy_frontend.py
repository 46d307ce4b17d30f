"""The pack in ComfyUI's real frontend (comfyui_frontend_package of the cached 0.33.0 install), driven by Playwright
in headless Chromium from Debian (`apt-get install chromium`; Playwright cannot download its own browser here), one
browser and one page for the whole module, against one server of its own (comfy_server.ComfyServer).

Checks: our web extensions load (no console error naming the pack); every UI workflow in workflows/*.json loads through
the app's own `app.loadGraphData` with no missing node and no dialog, and `app.graphToPrompt().output` equals its API
twin in workflows/api/; the templates list (/api/workflow_templates) names every workflow and each thumbnail loads;
each node's help page is served where the frontend's node help looks (/extensions/ComfyUI-Bernini/docs/<Node>.md,
from the node definition's python_module; the rendering in the help panel is not scripted); one workflow
queued from the browser runs to completion.

Harmless extras of the frontend, the only normalisation: inputs that ComfyUI 0.33.0's native nodes gained after our
twins were written, which the frontend fills with their defaults (FRONTEND_EXTRAS). `_meta` titles are compared as is.

Tiny run from the browser: bernini_r_t2v with test_comfy_server.TINY's values set on the frontend graph's widgets
(the same override mechanism as the API runs, applied through the UI), then the app's own `queuePrompt`.

Python side: `playwright` (pinned in .ci/run, installed into the test venv) and `chromium` on PATH. Skipped with the
reason when either or ComfyUI is missing, unless BERNINI_REQUIRE_COMFYUI=1 (CI), which makes that a failure.
Screenshots of each loaded workflow: .ci/artifacts/comfy_frontend/ ($BERNINI_ARTIFACTS moves the root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from comfy_install import REPO
from comfy_server import ComfyServer, artifacts_dir, output_files
from test_comfy_server import (SIZE, TINY, _lora_names, _write_loras, _write_media,
                               install)  # noqa: F401  (install: the module fixture that finds ComfyUI)

PACK = "ComfyUI-Bernini"
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
RUN_FROM_BROWSER = "bernini_r_t2v"  # the renderer alone: only the tiny Bernini-R folder is needed
OURS = re.compile(r"bernini", re.IGNORECASE)  # the pack's folder, extension names and node types all carry it
# {class_type: {input: value}}: inputs ComfyUI 0.33.0's native nodes declare that the twins predate; the frontend
# always serialises them (bit_depth's default; SaveVideo's format is a dynamic combo with a codec sub-input), and
# LoadVideo's preview widget, which the server ignores.
FRONTEND_EXTRAS = {"CreateVideo": {"bit_depth": 8}, "SaveVideo": {"format.codec": "auto"},
                   "LoadVideo": {"video-preview": ""}}  # LoadVideo: its preview widget, ignored by the server


def _require(why: str):
    if os.environ.get("BERNINI_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"BERNINI_REQUIRE_COMFYUI=1 and {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def server(install, tmp_path_factory):  # noqa: F811
    from bernini_core.tiny import make_tiny_renderer

    base = tmp_path_factory.mktemp("comfyui_frontend")
    renderer = base / "models" / "bernini" / "Bernini-R-Diffusers"
    make_tiny_renderer(renderer, seed=0)
    # every file a workflow's widgets name exists, so the frontend flags nothing (a node's has_errors) on load
    _write_loras(base / "models" / "loras", renderer, _lora_names())
    (base / "input").mkdir(parents=True, exist_ok=True)
    _write_media(base / "input")
    log = artifacts_dir() / "comfy_frontend" / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.unlink()
    srv = ComfyServer(install, base, log)
    # a returning user: no first-run templates dialog over the canvas (and the screenshots)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


class Page:
    """One Playwright page on the server, with every console error, page error and failed response it saw."""

    def __init__(self, page):
        self.page, self.errors, self.responses = page, [], []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text} {m.location}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("response", lambda r: self.responses.append((r.status, r.url)))

    def ours(self, since: int = 0) -> list[str]:
        return [e for e in self.errors[since:] if OURS.search(e)]

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)


@pytest.fixture(scope="module")
def browser_page(server):
    chromium = shutil.which("chromium")
    if chromium is None:
        _require("no `chromium` on PATH (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require("the playwright package is missing (pip install playwright==1.64.1; .ci/run does)")
    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = Page(browser.new_page(viewport={"width": 1600, "height": 1000}))
            page.page.goto(server.url)
            # vueAppReady: the app set up its graph, node definitions and every extension (ours included)
            page.page.wait_for_function("() => window.app && window.app.vueAppReady === true", timeout=90_000)
            page.page.wait_for_function("() => window.LiteGraph && !!window.LiteGraph.registered_node_types"
                                        "['BerniniSampleVideo']", timeout=30_000)
            page.page.keyboard.press("Escape")  # whatever first-run dialog remains
            print(f"frontend ready in {time.monotonic() - started:.1f} s (browser {browser.version})")
            yield page
        finally:
            browser.close()


def test_our_web_extensions_load_without_console_errors(browser_page):
    names = browser_page.evaluate("() => window.app.extensions.map(e => e.name)")
    ours = sorted(n for n in names if OURS.search(n))
    assert browser_page.ours() == [], browser_page.ours()
    failed = [(s, u) for s, u in browser_page.responses if s >= 400 and PACK in u]
    assert failed == [], failed
    assert len(ours) == len(list((REPO / "web" / "js").glob("*.js"))) - 1, ours  # preset_hints_core is a module


# ---------------------------------------------------------------------------------------------- workflows
def _normalised(frontend: dict, twin: dict) -> dict:
    """The frontend's prompt less FRONTEND_EXTRAS' inputs where the twin lacks them and the value is the default."""
    out = json.loads(json.dumps(frontend))
    for node_id, node in out.items():
        extras = FRONTEND_EXTRAS.get(node["class_type"], {})
        twin_inputs = twin.get(node_id, {}).get("inputs", {})
        for name, default in extras.items():
            if name not in twin_inputs and node["inputs"].get(name) == default:
                del node["inputs"][name]
    return out


LOAD = """async (workflow) => {
  await window.app.loadGraphData(workflow);
  const types = window.LiteGraph.registered_node_types;
  // a missing node is a placeholder: a plain LGraphNode, not an instance of the class registered for its type
  return window.app.graph.nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
                                          registered: n.type in types && n instanceof types[n.type]}));
}"""
DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
  .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300))"""


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_loads_clean_and_converts_to_its_api_twin(browser_page, path):
    workflow = json.loads(path.read_text())
    seen = len(browser_page.errors)
    nodes = browser_page.evaluate(LOAD, workflow)
    browser_page.page.wait_for_timeout(300)  # the missing-nodes dialog and extension callbacks come a tick later
    shots = artifacts_dir() / "comfy_frontend"
    shots.mkdir(parents=True, exist_ok=True)
    browser_page.page.screenshot(path=str(shots / f"{path.stem}.png"))
    missing = [n for n in nodes if n["has_errors"] or not n["registered"]]
    assert missing == [], missing
    assert len(nodes) == len(workflow["nodes"])
    assert browser_page.evaluate(DIALOGS) == []
    assert browser_page.ours(seen) == [], browser_page.ours(seen)

    output = browser_page.evaluate("async () => (await window.app.graphToPrompt()).output")
    twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert _normalised(output, twin) == twin


# ---------------------------------------------------------------------------------------------- templates, help
def test_templates_list_every_workflow_with_a_thumbnail(browser_page):
    listed = browser_page.evaluate("async () => (await fetch('/api/workflow_templates')).json()")
    assert sorted(listed.get(PACK, [])) == sorted(p.stem for p in UI_WORKFLOWS), listed
    thumbs = browser_page.evaluate("""async (names) => Promise.all(names.map(async n => {
        const r = await fetch(`/api/workflow_templates/ComfyUI-Bernini/${n}.jpg`);
        const bytes = new Uint8Array(await r.arrayBuffer());
        return [n, r.status, r.headers.get('content-type'), bytes[0], bytes[1], bytes.length]; }))""",
                                   listed[PACK])
    bad = [t for t in thumbs if t[1:5] != [200, "image/jpeg", 0xFF, 0xD8] or t[5] < 1000]
    assert bad == [], bad


HELP = """async (name) => {
  // the frontend's NodeHelpService rule: a custom node's python_module custom_nodes.<pack> gives
  // /extensions/<pack>/docs/<Node>/<locale>.md, then /extensions/<pack>/docs/<Node>.md
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const def = pinia._s.get('nodeDef').nodeDefsByName[name];
  const pack = def.python_module.split('.')[1].split('@')[0];
  const r = await fetch(`/extensions/${pack}/docs/${name}.md`);
  return [def.python_module, r.status, await r.text()];
}"""


def test_node_help_pages_are_served_where_the_frontend_looks(browser_page):
    """Each web/docs/<Node>.md at the URL the frontend's node help derives from the served node definition, 200 with
    its text. Not checked: the markdown rendered in the node library's help panel (its nodeHelp store is created only
    by UI clicks this test does not script)."""
    docs = sorted((REPO / "web" / "docs").glob("*.md"))
    info = browser_page.evaluate("async () => await (await fetch('/object_info')).json()")
    ours = sorted(n for n, d in info.items() if d["python_module"] == f"custom_nodes.{PACK}")
    assert [d.stem for d in docs] == ours, "a node without a help page, or a page without a node"
    for doc in docs:
        module, status, text = browser_page.evaluate(HELP, doc.stem)
        assert (module, status) == (f"custom_nodes.{PACK}", 200), (doc.stem, module, status)
        assert text == doc.read_text(), doc.stem


# ---------------------------------------------------------------------------------------------- a run from the UI
SET_WIDGETS = """async ([workflow, overrides]) => {
  await window.app.loadGraphData(workflow);
  const set = [];
  for (const node of window.app.graph.nodes) {
    for (const [name, value] of Object.entries(overrides[node.type] || {})) {
      const widget = node.widgets.find(w => w.name === name);
      widget.value = value; widget.callback?.(value);
      set.push([node.type, name, value]);
    }
  }
  return set;
}"""


def test_workflow_queued_from_the_browser_runs(browser_page, server):
    import av

    path = REPO / "workflows" / f"{RUN_FROM_BROWSER}.json"
    workflow = json.loads(path.read_text())
    types = {n["type"] for n in workflow["nodes"]}
    overrides = {k: v for k, v in TINY.items() if k in types}
    done = browser_page.evaluate(SET_WIDGETS, [workflow, overrides])
    assert len(done) == sum(len(v) for v in overrides.values()), done
    before = set(server.get("/history"))
    started = time.monotonic()
    browser_page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 240
    while not (new := set(server.get("/history")) - before):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    (prompt_id,) = new
    entry = server.wait(prompt_id, timeout=240)
    assert entry["status"]["status_str"] == "success", entry["status"]
    prompt, extra = entry["prompt"][2], entry["prompt"][3]
    assert extra["extra_pnginfo"]["workflow"]["nodes"], "not queued by the frontend"  # the UI sends its graph
    assert {k: {n: prompt[k]["inputs"][n] for n in v} for k, v in
            ((i, overrides[p["class_type"]]) for i, p in prompt.items() if p["class_type"] in overrides)} \
        == {i: overrides[p["class_type"]] for i, p in prompt.items() if p["class_type"] in overrides}
    (video,) = output_files(entry, server.base)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (SIZE, SIZE)
        assert sum(1 for _ in container.decode(stream)) == TINY["BerniniSources"]["frames"]
    assert browser_page.ours() == [], browser_page.ours()
    print(f"{RUN_FROM_BROWSER} queued from the browser ran in {time.monotonic() - started:.1f} s")
