"""The pack in ComfyUI's real frontend (comfyui_frontend_package 1.49.6 of the cached 0.33.0 install), driven by
Playwright in headless Chromium from Debian (`apt-get install chromium`; Playwright cannot download its own browser
here), one browser and one 1280x720 page for the whole module, against one server of its own
(comfy_server.ComfyServer). Each check does what a user does, through the frontend's own commands and controls.

Checks:
- our web extensions load (no console error naming the pack, no failed request to it);
- every UI workflow in workflows/*.json opened as a file (Ctrl+O, then the file chooser: the frontend's
  `handleFile`, which restores the file's extra.ds) loads with no missing node and no dialog, opens with the file's
  own view, every node's box (title bar included, from `app.canvas.ds` and the node's pos/size) inside the visible
  canvas (the canvas less the tab bar and side toolbar laid over it) and clear of the floating panels (view-mode
  toggle, Run bar, minimap, zoom controls), and `app.graphToPrompt().output` equals its API twin in workflows/api/;
- the templates list (/api/workflow_templates) names every workflow and serves each thumbnail; the templates dialog
  (command Comfy.BrowseTemplates, then the pack's entry under Extensions) shows one card per workflow, each card's
  thumbnail loaded at the JPEG's own size; a card clicked opens its workflow (the frontend fits the view itself)
  with no missing node, every node in view;
- each node's help page is served where the frontend looks (/extensions/ComfyUI-Bernini/docs/<Node>.md, from the
  node definition's python_module) and renders in the right side panel's Info tab (a node selected, the selection
  toolbox's info button): the page's title, its section headings and first paragraph, for every node class;
- one workflow queued from the browser runs to completion.

Harmless extras of the frontend, the only normalisation: inputs that ComfyUI 0.33.0's native nodes gained after our
twins were written, which the frontend fills with their defaults (FRONTEND_EXTRAS). `_meta` titles are compared as is.

Tiny run from the browser: bernini_r_t2v with test_comfy_server.TINY's values set on the frontend graph's widgets
(the same override mechanism as the API runs, applied through the UI), then the app's own `queuePrompt`.

Python side: `playwright` (pinned in .ci/run, installed into the test venv) and `chromium` on PATH. Skipped with the
reason when either or ComfyUI is missing, unless BERNINI_REQUIRE_COMFYUI=1 (CI), which makes that a failure.
Screenshots (each workflow opened, the templates dialog, the template opened, a help page) and the server log:
.ci/artifacts/comfy_frontend/ ($BERNINI_ARTIFACTS moves the root).
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
OPEN_TEMPLATE = "bernini_r_t2v"  # the card clicked in the templates dialog
PAGE = {"width": 1280, "height": 720}  # a small laptop's page: the framing in docs/dev/gen_workflows.py targets it
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
        # file choosers intercepted from the start: enabled only by expect_file_chooser, the interception can come
        # after the page already asked for the chooser, which then never appears
        page.on("filechooser", lambda chooser: None)

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
            page = Page(browser.new_page(viewport=PAGE))
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


def _differences(frontend: dict, twin: dict) -> dict:
    """{node id: {input, class_type or _meta: (frontend's, twin's)}} where they differ (None: absent on that side)."""
    out = {}
    for node_id in sorted(set(frontend) | set(twin)):
        ours, theirs = frontend.get(node_id, {}), twin.get(node_id, {})
        a, b = ours.get("inputs", {}), theirs.get("inputs", {})
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k]}
        diff.update({k: (ours.get(k), theirs.get(k)) for k in ("class_type", "_meta") if ours.get(k) != theirs.get(k)})
        if diff:
            out[node_id] = diff
    return out


NODES = """() => {
  const types = window.LiteGraph.registered_node_types;
  // a missing node is a placeholder: a plain LGraphNode, not an instance of the class registered for its type
  return window.app.graph.nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
                                          registered: n.type in types && n instanceof types[n.type]}));
}"""
DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
  .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300))"""
ACTIVE = "() => window.app.extensionManager.workflow.activeWorkflow?.path ?? null"
OPENED = """([before, count]) => window.app.extensionManager.workflow.activeWorkflow?.path !== before
  && window.app.graph.nodes.length === count && !document.querySelector('[role=dialog] [data-testid^=template-workflow-]')"""
# The view as drawn: the canvas element, the chrome the frontend lays over it (by the data-testid 1.49.6 gives each),
# LiteGraph's transform (canvas pixel = (graph point + ds.offset) * ds.scale) and every node's pos / size.
VIEW = """() => {
  const box = e => { const b = e?.getBoundingClientRect(); return b && b.width > 0 && b.height > 0
                     ? [b.left, b.top, b.right, b.bottom] : null; };
  const byId = id => box(document.querySelector(`[data-testid=${id}]`));
  const ds = window.app.canvas.ds;
  return {canvas: box(window.app.canvasEl), tabs: byId('topbar-workflow-tabs'), side: byId('side-toolbar'),
          panels: {'view-mode toggle': byId('view-mode-toggle'), 'Run bar': byId('action-bar-card'),
                   minimap: byId('minimap-container'),
                   'zoom controls': box(document.querySelector('[data-testid=zoom-controls-button]')
                                        ?.closest('.p-buttongroup'))},
          scale: ds.scale, offset: [...ds.offset], title_height: window.LiteGraph.NODE_TITLE_HEIGHT,
          nodes: window.app.graph.nodes.map(n => ({type: n.type, pos: [...n.pos], size: [...n.size]}))};
}"""


def _out_of_view(view: dict) -> list:
    """Each node whose on-screen box, title bar included (drawn title_height above pos), leaves the visible canvas
    (the canvas less the tab bar above and the side toolbar left of it) or meets a floating panel, with the box."""
    assert view["canvas"] and view["tabs"] and view["side"] and all(view["panels"].values()), view  # chrome found
    cx, cy, right, bottom = view["canvas"]
    left, top = max(cx, view["side"][2]), max(cy, view["tabs"][3])
    scale, (ox, oy) = view["scale"], view["offset"]
    bad = []
    for node in view["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        box = [cx + (x + ox) * scale, cy + (y - view["title_height"] + oy) * scale,
               cx + (x + w + ox) * scale, cy + (y + h + oy) * scale]
        shown = [round(v) for v in box]
        if not (left <= box[0] and top <= box[1] and box[2] <= right and box[3] <= bottom):
            bad.append((node["type"], "outside the visible canvas", shown, [left, top, right, bottom]))
        for name, (pl, pt, pr, pb) in view["panels"].items():
            if box[0] < pr and pl < box[2] and box[1] < pb and pt < box[3]:
                bad.append((node["type"], f"under the {name}", shown))
    return bad


def test_out_of_view_flags_a_node_off_the_canvas_under_the_chrome_or_a_panel():
    """The in-view rule on a made-up 1280x720 view (no browser): it can fail, and for each reason."""
    view = {"canvas": [0, 0, 1280, 720], "tabs": [0, 0, 1280, 38], "side": [0, 38, 59, 720],
            "panels": {"minimap": [1023, 462, 1276, 662]}, "scale": 0.5, "offset": [200, 100], "title_height": 30,
            "nodes": [{"type": "A", "pos": [0, 100], "size": [300, 200]}]}  # on screen: (100, 85) to (250, 200)
    assert _out_of_view(view) == []
    outside = "outside the visible canvas"
    for pos, why in (([-100, 100], outside), ([0, -40], outside), ([4000, 100], outside),
                     ([1800, 900], "under the minimap")):  # under the side toolbar, the tab bar, off the right
        moved = dict(view, nodes=[{"type": "A", "pos": pos, "size": [300, 200]}])
        assert [b[1] for b in _out_of_view(moved)] == [why], (pos, _out_of_view(moved))


def _open_file(page: Page, path, count: int) -> None:
    """Ctrl+O and the file chooser, as a user opens a workflow file (the frontend's handleFile, open source
    'file_button'; drag-drop takes the same path with 'file_drop')."""
    before = page.evaluate(ACTIVE)
    page.evaluate("() => document.activeElement?.blur()")  # the shortcut is ignored while a text field has focus
    with page.page.expect_file_chooser(timeout=10_000) as chooser:
        page.page.keyboard.press("ControlOrMeta+KeyO")
    chooser.value.set_files(str(path))
    page.page.wait_for_function(OPENED, arg=[before, count], timeout=30_000)
    page.page.wait_for_timeout(300)  # the missing-nodes dialog and extension callbacks come a tick later


def _shot(page: Page, name: str) -> None:
    shots = artifacts_dir() / "comfy_frontend"
    shots.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(shots / f"{name}.png"))


def _loaded_clean(page: Page, count: int, seen: int) -> None:
    nodes = page.evaluate(NODES)
    missing = [n for n in nodes if n["has_errors"] or not n["registered"]]
    assert missing == [], missing
    assert len(nodes) == count
    assert page.evaluate(DIALOGS) == []
    assert page.ours(seen) == [], page.ours(seen)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_opened_as_a_file_loads_clean_in_view_and_converts_to_its_api_twin(browser_page, path):
    workflow = json.loads(path.read_text())
    seen = len(browser_page.errors)
    _open_file(browser_page, path, len(workflow["nodes"]))
    _shot(browser_page, path.stem)
    _loaded_clean(browser_page, len(workflow["nodes"]), seen)

    view = browser_page.evaluate(VIEW)
    # the file's own view, restored (the frontend refits only when no node would be visible)
    assert {"scale": view["scale"], "offset": view["offset"]} == workflow["extra"]["ds"]
    assert _out_of_view(view) == []

    output = browser_page.evaluate("async () => (await window.app.graphToPrompt()).output")
    twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert _differences(_normalised(output, twin), twin) == {}  # {node: {input: (frontend, twin)}}
    assert _normalised(output, twin) == twin


# ---------------------------------------------------------------------------------------------- templates
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


CARD_IDS = """() => Array.from(document.querySelectorAll('[role=dialog] [data-testid^=template-workflow-]'))
  .map(e => e.getAttribute('data-testid').slice('template-workflow-'.length))"""
IMAGE_LOADED = "(img) => img.complete && img.naturalWidth > 0"


def test_templates_dialog_shows_a_card_per_workflow_and_opens_one(browser_page):
    """Browse Templates, the pack under Extensions: one card per workflow, its thumbnail decoded at the JPEG's own
    size (the cards load their images as they scroll into view); then a card clicked opens its workflow."""
    from PIL import Image

    page, expected = browser_page.page, sorted(p.stem for p in UI_WORKFLOWS)
    seen, responses = len(browser_page.errors), len(browser_page.responses)
    browser_page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(PACK, exact=True).click()  # the pack's entry in the dialog's navigation
    deadline = time.monotonic() + 30
    while sorted(cards := browser_page.evaluate(CARD_IDS)) != expected and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert sorted(cards) == expected
    page.wait_for_function(IMAGE_LOADED, arg=dialog.locator("[data-testid^=template-workflow-] img").first
                           .element_handle(), timeout=10_000)
    _shot(browser_page, "templates_dialog")
    sizes = {}
    for name in cards:
        card = dialog.locator(f"[data-testid=template-workflow-{name}]")
        card.scroll_into_view_if_needed()
        image = card.locator("img").first.element_handle(timeout=10_000)
        page.wait_for_function(IMAGE_LOADED, arg=image, timeout=10_000)
        sizes[name] = tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))
    with_jpeg_size = {}
    for name in cards:
        with Image.open(REPO / "workflows" / f"{name}.jpg") as jpeg:
            with_jpeg_size[name] = jpeg.size
    assert sizes == with_jpeg_size
    failed = [(s, u) for s, u in browser_page.responses[responses:] if s >= 400 and PACK in u]
    assert failed == [], failed

    workflow = json.loads((REPO / "workflows" / f"{OPEN_TEMPLATE}.json").read_text())
    before = browser_page.evaluate(ACTIVE)
    dialog.locator(f"[data-testid=template-workflow-{OPEN_TEMPLATE}]").click()
    page.wait_for_function(OPENED, arg=[before, len(workflow["nodes"])], timeout=30_000)
    page.wait_for_timeout(300)
    _shot(browser_page, f"template_{OPEN_TEMPLATE}")
    _loaded_clean(browser_page, len(workflow["nodes"]), seen)
    assert _out_of_view(browser_page.evaluate(VIEW)) == []


# ---------------------------------------------------------------------------------------------- node help
OUR_NODE_DEFS = """(pack) => {
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  return Object.values(pinia._s.get('nodeDef').nodeDefsByName)
    .filter(d => d.python_module === `custom_nodes.${pack}`).map(d => d.name);
}"""
HELP_URL = """async (name) => {
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
    its text."""
    docs = sorted((REPO / "web" / "docs").glob("*.md"))
    ours = sorted(browser_page.evaluate(OUR_NODE_DEFS, PACK))
    assert [d.stem for d in docs] == ours, "a node without a help page, or a page without a node"
    for doc in docs:
        module, status, text = browser_page.evaluate(HELP_URL, doc.stem)
        assert (module, status) == (f"custom_nodes.{PACK}", 200), (doc.stem, module, status)
        assert text == doc.read_text(), doc.stem


HELP_PANEL = "[data-testid=properties-panel] .node-help-content .markdown-content"  # the Info tab's rendered page
ADD_NODES = """(types) => types.forEach((type, i) => {
  const node = window.LiteGraph.createNode(type);
  node.pos = [120 + 40 * i, 160 + 30 * i];  // the first in view, under the selection toolbox it gets
  window.app.graph.add(node);
})"""
# The Info tab asks for the page in the UI's language first (/docs/<Node>/<locale>.md), then /docs/<Node>.md: the
# first answers 404, which Chromium logs as a console error; the pack ships one language.
LOCALE_FIRST = re.compile(r"status of 404 .*/extensions/ComfyUI-Bernini/docs/\w+/[\w-]+\.md")
SELECT = """(type) => { const canvas = window.app.canvas;
  canvas.selectNode(window.app.graph.nodes.find(n => n.type === type)); canvas.setDirty(true, true); }"""
SHOWN = """([panel, title]) => { const page = document.querySelector(panel);
  return page?.querySelector('h1')?.innerText === title ? page : null; }"""


def _help_expected(doc) -> tuple:
    """(title, section headings, first paragraph as plain text) of a help page, read from its markdown."""
    lines = doc.read_text().splitlines()
    assert lines[0].startswith("# "), doc.name
    headings = [line[3:] for line in lines if line.startswith("## ")]
    paragraph = []
    for line in lines[1:]:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            break
    return lines[0][2:], headings, re.sub(r"\*\*|`", "", " ".join(paragraph))


def test_node_help_pages_render_in_the_info_panel(browser_page):
    """On a new blank workflow, one node of each of our classes; the first selected, the selection toolbox's info
    button opens the right side panel's Info tab; then each node selected in turn: the tab shows its page rendered
    (title, section headings, first paragraph)."""
    page, seen = browser_page.page, len(browser_page.errors)
    docs = sorted((REPO / "web" / "docs").glob("*.md"))
    before = browser_page.evaluate(ACTIVE)
    browser_page.evaluate("() => window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function(OPENED, arg=[before, 0], timeout=10_000)
    browser_page.evaluate(ADD_NODES, [d.stem for d in docs])
    browser_page.evaluate(SELECT, docs[0].stem)
    try:
        page.locator("[data-testid=info-button]").click(timeout=10_000)
        for doc in docs:
            title, headings, paragraph = _help_expected(doc)
            browser_page.evaluate(SELECT, doc.stem)
            try:
                shown = page.wait_for_function(SHOWN, arg=[HELP_PANEL, title], timeout=10_000)
            except Exception:
                panel = browser_page.evaluate("() => document.querySelector('[data-testid=properties-panel]')"
                                              "?.innerText.slice(0, 500) ?? null")
                pytest.fail(f"{doc.stem}: the Info tab does not show '# {title}'; it shows: {panel!r}")
            rendered = shown.evaluate("page => [Array.from(page.querySelectorAll('h2')).map(h => h.innerText),"
                                      " page.innerText]")
            assert rendered[0] == headings, doc.stem
            assert paragraph in " ".join(rendered[1].split()), (doc.stem, paragraph)
        _shot(browser_page, f"help_{docs[-1].stem}")
    finally:
        browser_page.evaluate("() => document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia"
                              "._s.get('rightSidePanel').closePanel()")
    errors = [e for e in browser_page.ours(seen) if not LOCALE_FIRST.search(e)]
    assert errors == [], errors


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
    before, seen = set(server.get("/history")), len(browser_page.errors)
    started = time.monotonic()
    # queuePrompt answers false when the server refuses the prompt (its node errors are then in the store)
    queued = browser_page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    assert queued is True, browser_page.evaluate(
        "() => { const errors = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia"
        "._s.get('executionError'); return JSON.stringify([errors.lastNodeErrors, errors.lastPromptError]); }")
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
    assert browser_page.ours(seen) == [], browser_page.ours(seen)
    print(f"{RUN_FROM_BROWSER} queued from the browser ran in {time.monotonic() - started:.1f} s")
