// Readable presets: beside each sentinel widget (-1 / 0 / auto) of Sample, Plan and Sources, the value the task
// preset will use for the connected model and task, e.g. "omega_txt (preset 4.5)". Only the label changes: the widget
// value stays the sentinel, so saved workflows and API prompts are unchanged and explicit numbers still win.
import { app } from "../../../scripts/app.js";
import { SENTINEL_WIDGETS, familyOfModel, isSentinel, presetHints } from "./preset_hints_core.js";

const TABLE_URL = new URL("../bernini_presets.json", import.meta.url);
const REFRESH_MS = 700; // upstream widgets (task, model) change without telling this node: poll, cheaply

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function upstream(node, inputName) {
  const slot = node?.findInputSlot?.(inputName) ?? -1;
  return slot >= 0 ? node.getInputNode(slot) : null;
}

function follow(node, inputName, passThrough, hops = 8) {
  let current = upstream(node, inputName);
  while (current && passThrough.includes(current.type) && hops-- > 0) current = upstream(current, inputName);
  return current;
}

function taskOf(node) {
  const source = follow(node, "conditioning", ["BerniniPlanSemantics"]);
  return source?.type === "BerniniEncodePrompt" ? widgetValue(source, "task") : null;
}

function context(table, node) {
  let loader = null;
  if (node.type === "BerniniSampleVideo") loader = follow(node, "renderer", ["BerniniApplyLora"]);
  if (node.type === "BerniniSources") loader = upstream(node, "vae");
  if (node.type === "BerniniPlanSemantics") loader = upstream(node, "planner");
  const known = ["BerniniLoadRenderer", "BerniniLoadPlanner"].includes(loader?.type);
  return {
    nodeType: node.type, task: taskOf(node), preset: widgetValue(node, "preset") ?? "official",
    family: known ? familyOfModel(table, widgetValue(loader, "model")) : null,
  };
}

function refresh(table, labels, node) {
  const widgets = SENTINEL_WIDGETS[node.type];
  if (!widgets) return;
  const hints = presetHints(table, context(table, node));
  let changed = false;
  for (const widget of node.widgets ?? []) {
    if (!widgets[widget.name]) continue;
    if (!labels.has(widget)) labels.set(widget, widget.label);
    const hint = isSentinel(widgets[widget.name][0], widget.value) ? hints[widget.name] : undefined;
    const label = hint ? `${widget.name} (${hint})` : labels.get(widget);
    if (widget.label !== label) {
      widget.label = label;
      changed = true;
    }
  }
  if (changed) node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "Bernini.PresetHints",
  async setup() {
    let table;
    try {
      table = await (await fetch(TABLE_URL)).json();
    } catch (error) {
      console.warn("Bernini: no preset table, the -1 / 0 / auto widgets show no preset values:", error);
      return;
    }
    const labels = new WeakMap(); // each widget's own label, restored when its value leaves the sentinel
    setInterval(() => {
      for (const node of app.graph?._nodes ?? app.graph?.nodes ?? []) refresh(table, labels, node);
    }, REFRESH_MS);
  },
});
