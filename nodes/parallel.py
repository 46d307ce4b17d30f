"""Bernini Multi-GPU: declarative inputs over bernini_core.node_api.multi_gpu."""

from bernini_core import node_api


class BerniniMultiGPU:
    DESCRIPTION = ("Renders with several GPUs (on this machine or a Ray cluster): connect to Load Bernini Renderer's "
                   "parallel input. The DiT experts load on a pool of Ray workers, one per GPU, that split each "
                   "denoising step's tokens (Ulysses) and guidance passes between them; UMT5, the VAE and the planner "
                   "stay in ComfyUI. Needs Ray (pip install ray). The pool stays loaded between runs; 'Free model "
                   "and node cache' or /free ends it.")
    CATEGORY = "Bernini/loaders"
    FUNCTION = "configure"
    RETURN_TYPES = ("BERNINI_PARALLEL",)
    RETURN_NAMES = ("parallel",)
    OUTPUT_TOOLTIPS = ("Connect to Load Bernini Renderer's parallel input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gpus": ("STRING", {"default": "2", "multiline": False,
                                "tooltip": "How many GPUs (e.g. 4: any 4 of the Ray cluster), or which of this "
                                           "machine's GPUs by id (e.g. 0,1,2,3)."}),
            "ulysses": ("INT", {"default": 0, "min": 0, "max": 64,
                                "tooltip": "GPUs that split one DiT pass's tokens (Ulysses sequence parallelism); "
                                           "must divide the head count (40 for A14B, 12 for 1.3B). 0 = auto: the "
                                           "largest divisor that fits gpus / cfg_parallel."}),
            "cfg_parallel": ("INT", {"default": 1, "min": 1, "max": 8,
                                     "tooltip": "Groups of GPUs that run different guidance passes of a step at the "
                                                "same time (gpus = ulysses x cfg_parallel)."}),
            "fsdp": ("BOOLEAN", {"default": False,
                                 "tooltip": "Shard each expert's weights over the Ulysses GPUs (1/ulysses of the "
                                            "weights per GPU) instead of a whole copy on every GPU."}),
            "ray_address": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": "Empty: start (or reuse) a Ray runtime on this machine. 'auto' or "
                                                  "host:port: join a running Ray cluster (ray start --head ...)."}),
            "device": (["cuda", "cpu"], {"default": "cuda",
                                         "tooltip": "cuda: one worker per GPU. cpu: CPU worker processes (for trying "
                                                    "the node, or tests, on a machine without GPUs)."}),
            "timeout": ("INT", {"default": 1800, "min": 10, "max": 86400,
                                "tooltip": "Seconds a worker waits for the others before it gives up (a hung or "
                                           "dead worker)."}),
        }}

    def configure(self, gpus, ulysses, cfg_parallel, fsdp, ray_address, device, timeout):
        return (node_api.multi_gpu(gpus, ulysses, cfg_parallel, fsdp, ray_address, device, timeout),)


NODE_CLASS_MAPPINGS = {"BerniniMultiGPU": BerniniMultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniMultiGPU": "Bernini Multi-GPU"}
