// The values behind the sentinel widgets (-1 / 0 / auto) of Sample, Plan and Sources: pure functions over the preset
// table web/bernini_presets.json (written from bernini_core.tasks by docs/dev/gen_presets.py). No ComfyUI import, so
// tests run them under Node; web/js/preset_hints.js puts the result on the widgets.

// widget -> [sentinel, engine setting]. auto: the combo's "auto"; 0: zero; -1: any negative value (as node_api reads).
export const SENTINEL_WIDGETS = {
  BerniniSampleVideo: {
    guidance_mode: ["auto", "guidance_mode"], steps: [0, "num_inference_steps"], flow_shift: [0, "flow_shift"],
    omega_vid: [-1, "omega_vid"], omega_img: [-1, "omega_img"], omega_txt: [-1, "omega_txt"],
    omega_tgt: [-1, "omega_tgt"], omega_scale: [-1, "omega_scale"], sampler: ["auto", "sampler"],
  },
  BerniniPlanSemantics: {
    planning_steps: [0, "planning_step"], vit_denoising_steps: [0, "vit_denoising_step"],
    vit_txt_cfg: [-1, "vit_txt_cfg"], vit_img_cfg: [-1, "vit_img_cfg"],
  },
  BerniniSources: {
    width: [0, "width"], height: [0, "height"], frames: [0, "num_frames"], max_image_size: [0, "max_image_size"],
  },
};

export function isSentinel(sentinel, value) {
  if (sentinel === "auto") return value === "auto";
  const number = Number(value);
  return sentinel === 0 ? number === 0 : number < 0;
}

// The preset family of a model folder name: the table's static names; other folders by their name (Bernini-R...,
// ...v2), else unknown (null: no hint rather than a wrong one).
export function familyOfModel(table, model) {
  if (typeof model !== "string") return null;
  if (table.models[model]) return table.models[model];
  if (/bernini[-_ ]?r\b/i.test(model)) return "renderer";
  if (/bernini/i.test(model)) return /v2/i.test(model) ? "v2" : "v1";
  return null;
}

function shown(value) {
  return typeof value === "number" ? String(Number(value.toFixed(4))) : String(value);
}

// {widget name: hint text} for a node, given the family of its model, the task of its prompt and (Sample) its
// preset kind ("official" | "fast"). Empty when something is unknown.
export function presetHints(table, { nodeType, family, task, preset = "official" }) {
  const widgets = SENTINEL_WIDGETS[nodeType];
  const base = table.presets[family]?.[task];
  if (!widgets || !base) return {};
  if (nodeType === "BerniniPlanSemantics" && family === "renderer") return {};
  const settings = { ...base, sampler: table.official_sampler };
  if (nodeType === "BerniniSampleVideo" && preset === "fast") Object.assign(settings, table.fast);
  const hints = {};
  for (const [widget, [, key]] of Object.entries(widgets)) {
    const unused = (table.unused[family] ?? []).includes(key) ||
      (settings.guidance_mode === table.no_guidance && table.no_guidance_ignores.includes(key));
    if (nodeType === "BerniniSampleVideo" && unused) hints[widget] = "unused";
    else if (nodeType === "BerniniSources" && (key === "width" || key === "height") && settings[key] === 0)
      hints[widget] = "preset: the source's";
    else if (settings[key] !== undefined) hints[widget] = `preset ${shown(settings[key])}`;
  }
  return hints;
}
