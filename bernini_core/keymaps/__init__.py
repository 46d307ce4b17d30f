"""Key-name maps between the official / ComfyUI checkpoint layouts and our module names."""
