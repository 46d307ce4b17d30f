// Enhance Bernini Prompt: shows the enhanced prompt (the node's ui.text) on the node after each run.
// Frontends with the shared text preview (the one "Preview as Text" uses) get that; older ones a read-only text box.
// Neither is saved with the workflow (serialize false) nor sent with a prompt.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const NODE = "BerniniEnhancePrompt";
const BOX = "enhanced_prompt";

function preview() {
  return window.comfyAPI?.textPreviewWidgets;
}

function showText(node, message) {
  const shared = preview();
  if (shared) {
    shared.updateTextPreviewWidgets(node, message);
    return;
  }
  const text = (message?.text ?? []).join("\n\n");
  let box = node.widgets?.find((w) => w.name === BOX);
  if (!box) {
    box = ComfyWidgets.STRING(node, BOX, ["STRING", { multiline: true }], app).widget;
    box.serialize = false;
    box.options = { ...(box.options ?? {}), serialize: false };
    if (box.inputEl) {
      box.inputEl.readOnly = true;
      box.inputEl.style.opacity = 0.7;
    }
  }
  box.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "Bernini.EnhancePrompt.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      created?.apply(this, arguments);
      preview()?.addTextPreviewWidgets(this);
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      showText(this, message);
    };
  },
});
