"""ComfyUI node classes (V1 interface). The six-stage node set lands with the ComfyUI-surface issue;
until then the pack registers no nodes, and importing it stays side-effect free."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
