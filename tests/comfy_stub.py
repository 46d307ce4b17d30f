"""A stand-in for the few ComfyUI modules comfy_bridge calls (ComfyUI cannot be installed here).

`build(models_dir)` returns fresh module objects and a `Recorder`; tests put the modules into sys.modules for
the duration of one test and take them out again (other tests assert ComfyUI is absent). Behaviour follows the
ComfyUI sources cited in docs/node_contract.md §6: ModelPatcher(model, load_device, offload_device, size=0),
load_models_gpu([patchers]), ProgressBar(total).update_absolute(value, total=None, preview=None),
InterruptProcessingException(BaseException), folder_paths' registry, comfy.ops layers that cast weights to the
input's dtype/device when `comfy_cast_weights` is set and, with dynamic VRAM on, leave `weight` None until
load_state_dict unless a class overrides _load_from_state_dict.
"""

from __future__ import annotations

import enum
import os
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

MODULE_NAMES = ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.utils",
                "comfy.latent_formats", "comfy.cli_args", "comfy.memory_management", "comfy.lora", "folder_paths")


@dataclass
class Recorder:
    """What the bridge did, and knobs the test turns."""

    devices: dict = field(default_factory=dict)  # model_management function name -> torch.device
    patchers: list = field(default_factory=list)  # every ModelPatcher built
    loads: list = field(default_factory=list)  # one list of patchers per load_models_gpu call
    full_loads: list = field(default_factory=list)  # the force_full_load flag of each load_models_gpu call
    memory: list = field(default_factory=list)  # the memory_required of each load_models_gpu call
    bars: list = field(default_factory=list)  # every ProgressBar built
    interrupt_checks: int = 0
    interrupt_at: Optional[int] = None  # raise on this (1-based) interrupt check
    current: list = field(default_factory=list)  # the patchers loaded now (their weight patches applied)


def build(models_dir) -> tuple[dict, Recorder]:
    rec = Recorder()
    modules = {name: types.ModuleType(name) for name in MODULE_NAMES}
    modules["comfy"].__path__ = []  # a package
    for name in MODULE_NAMES[1:-1]:
        setattr(modules["comfy"], name.split(".")[1], modules[name])

    # ------------------------------------------------------------------ comfy.model_management
    mm = modules["comfy.model_management"]

    class InterruptProcessingException(BaseException):
        pass

    def device_function(name):
        return lambda: rec.devices.get(name, torch.device("cpu"))

    for name in ("get_torch_device", "unet_offload_device", "text_encoder_device", "text_encoder_offload_device",
                 "vae_device", "vae_offload_device", "intermediate_device"):
        setattr(mm, name, device_function(name))

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        rec.loads.append(list(models))
        rec.full_loads.append(force_full_load)
        rec.memory.append(memory_required)
        for patcher in models:
            # model_management.load_models_gpu: another clone of the same model is unloaded (its weight patches
            # taken off) before this one loads and patches the shared module.
            for other in [p for p in rec.current if p is not patcher and p.is_clone(patcher)]:
                other.unpatch_model()
                rec.current.remove(other)
            patcher.model.to(patcher.load_device)
            patcher.model.device = patcher.load_device  # ModelPatcher.load records where the model went
            if patcher not in rec.current:
                patcher.load(patcher.load_device)
                rec.current.append(patcher)

    def throw_exception_if_processing_interrupted():
        rec.interrupt_checks += 1
        if rec.interrupt_at is not None and rec.interrupt_checks == rec.interrupt_at:
            rec.interrupt_at = None  # ComfyUI clears the flag when it raises
            raise InterruptProcessingException()

    def unload_all_models():
        """model_management.unload_all_models (/free with unload_models): every loaded model is detached."""
        for patcher in list(rec.current):
            patcher.detach()
        rec.current.clear()

    mm.unload_all_models = unload_all_models
    mm.InterruptProcessingException = InterruptProcessingException
    mm.load_models_gpu = load_models_gpu
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    # ------------------------------------------------------------------ comfy.model_patcher
    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False,
                     fast_disk=False):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
            if getattr(model, "device", None) is None:
                model.device = offload_device
            self.patches, self.backup = {}, {}
            rec.patchers.append(self)

        def model_size(self):
            return self.size

        # weight patches as comfy/model_patcher.py: clone / is_clone / add_patches / load / unpatch_model
        def clone(self):
            n = self.__class__(self.model, self.load_device, self.offload_device, self.size)
            n.patches = {k: v[:] for k, v in self.patches.items()}
            return n

        def is_clone(self, other):
            return getattr(other, "model", None) is self.model

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            model_sd = self.model.state_dict()
            added = [k for k in patches if k in model_sd]
            for k in added:
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model, None, None))
            return added

        def patch_weight_to_device(self, key, device_to=None):
            op_path, leaf = key.rsplit(".", 1)
            op = self.model.get_submodule(op_path)
            weight = getattr(op, leaf)
            set_func, convert_func = getattr(op, f"set_{leaf}", None), getattr(op, f"convert_{leaf}", None)
            if key not in self.backup:
                self.backup[key] = weight  # the tensor object itself: the patched weight replaces it
            temp = weight.to(torch.float32, copy=True)
            if convert_func is not None:
                temp = convert_func(temp, inplace=True)
            out = modules["comfy.lora"].calculate_weight(self.patches[key], temp, key)
            if set_func is None:
                setattr(op, leaf, torch.nn.Parameter(out.to(weight.dtype), requires_grad=False))
            else:
                set_func(out, inplace_update=False, seed=0)

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            for name, module in self.model.named_modules():
                if any(True for _ in module.children()):
                    continue  # ModelPatcher._load_list: parameters of non-leaf modules are never patched
                for leaf, _ in list(module.named_parameters(recurse=False)):
                    key = f"{name}.{leaf}" if name else leaf
                    if key in self.patches:
                        self.patch_weight_to_device(key, device_to)

        def detach(self, unpatch_all=True):
            self.unpatch_model(unpatch_weights=unpatch_all)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for key, weight in self.backup.items():
                    op_path, leaf = key.rsplit(".", 1)
                    setattr(self.model.get_submodule(op_path), leaf, weight)
                self.backup.clear()

    class LowVramPatch:
        def __init__(self, key, patches, convert_func=None, set_func=None):
            self.key, self.patches = key, patches

        def __call__(self, weight):
            return modules["comfy.lora"].calculate_weight(self.patches[self.key], weight, self.key)

    class CoreModelPatcher(ModelPatcher):
        pass

    modules["comfy.model_patcher"].ModelPatcher = ModelPatcher
    modules["comfy.model_patcher"].CoreModelPatcher = CoreModelPatcher
    modules["comfy.model_patcher"].LowVramPatch = LowVramPatch

    # ------------------------------------------------------------------ comfy.lora (comfy/lora.py, weight_adapter)
    lora_names = (("{}.lora_up.weight", "{}.lora_down.weight"), ("{}_lora.up.weight", "{}_lora.down.weight"),
                  ("{}.lora_B.weight", "{}.lora_A.weight"), ("{}.lora.up.weight", "{}.lora.down.weight"),
                  ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"))

    def load_lora(lora, to_load, log_missing=True):
        patch_dict = {}
        for x, target in to_load.items():
            alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
            for up_name, down_name in lora_names:
                if up_name.format(x) in lora:
                    mid = lora.get(f"{x}.lora_mid.weight")
                    patch_dict[target] = ("lora", (lora[up_name.format(x)], lora[down_name.format(x)], alpha, mid,
                                                   None, None))
                    break
            if f"{x}.diff" in lora:
                patch_dict[target] = ("diff", (lora[f"{x}.diff"],))
            if f"{x}.diff_b" in lora:
                patch_dict[target[: -len(".weight")] + ".bias"] = ("diff", (lora[f"{x}.diff_b"],))
        return patch_dict

    def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32):
        for strength, value, strength_model, _, _ in patches:
            if strength_model != 1.0:
                weight *= strength_model
            kind, v = value
            if kind == "diff":
                weight += strength * v[0].to(weight.device, weight.dtype)
            elif kind == "lora":
                up, down = v[0].to(weight.device, intermediate_dtype), v[1].to(weight.device, intermediate_dtype)
                scale = v[2] / down.shape[0] if v[2] is not None else 1.0  # no alpha: 1.0, not alpha = rank
                weight += ((strength * scale) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)).to(
                    weight.dtype)
        return weight

    modules["comfy.lora"].load_lora = load_lora
    modules["comfy.lora"].calculate_weight = calculate_weight

    # ------------------------------------------------------------------ comfy.memory_management / comfy.ops
    memory = modules["comfy.memory_management"]
    memory.aimdo_enabled = False

    def cast(module, x):
        weight = module.weight.to(device=x.device, dtype=x.dtype)
        bias = None if module.bias is None else module.bias.to(device=x.device, dtype=x.dtype)
        return weight, bias

    def layer(torch_class, forward_cast, lazy):
        def __init__(self, *args, **kwargs):
            if lazy and memory.aimdo_enabled and type(self)._load_from_state_dict is _load_from_state_dict:
                torch.nn.Module.__init__(self)  # dynamic VRAM: parameters appear at load_state_dict
                self.weight = self.bias = None
                return
            torch_class.__init__(self, *args, **kwargs)

        def _load_from_state_dict(self, *args, **kwargs):
            return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)

        def forward(self, x):
            if self.comfy_cast_weights:
                return forward_cast(self, x)
            return torch_class.forward(self, x)

        return {"__init__": __init__, "_load_from_state_dict": _load_from_state_dict, "forward": forward,
                "reset_parameters": lambda self: None, "comfy_cast_weights": False}

    forwards = {
        "Linear": (torch.nn.Linear, lambda m, x: F.linear(x, *cast(m, x)), True),
        "Conv2d": (torch.nn.Conv2d, lambda m, x: m._conv_forward(x, *cast(m, x)), False),
        "Conv3d": (torch.nn.Conv3d, lambda m, x: m._conv_forward(x, *cast(m, x)), False),
        "LayerNorm": (torch.nn.LayerNorm, lambda m, x: F.layer_norm(
            x, m.normalized_shape, *(cast(m, x) if m.weight is not None else (None, None)), m.eps), False),
        "GroupNorm": (torch.nn.GroupNorm, lambda m, x: F.group_norm(x, m.num_groups, *cast(m, x), m.eps), False),
        "Embedding": (torch.nn.Embedding, lambda m, x: F.embedding(x, m.weight.to(x.device)), True),
    }
    class disable_weight_init:  # layer namespaces are classes in ComfyUI
        pass

    class manual_cast(disable_weight_init):
        pass

    for name, (torch_class, forward_cast, lazy) in forwards.items():
        base = type(name, (torch_class,), layer(torch_class, forward_cast, lazy))
        setattr(disable_weight_init, name, base)
        setattr(manual_cast, name, type(name, (base,), {"comfy_cast_weights": True}))
    modules["comfy.ops"].disable_weight_init = disable_weight_init
    modules["comfy.ops"].manual_cast = manual_cast

    # ------------------------------------------------------------------ comfy.utils
    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.updates = total, 0, []
            rec.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            self.updates.append((self.current, self.total, preview))

        def update(self, value):
            self.update_absolute(self.current + value)

    modules["comfy.utils"].ProgressBar = ProgressBar

    # ------------------------------------------------------------------ latent formats and preview settings
    class Wan21:  # arbitrary factors: the test derives its expectation from whatever the stub holds
        latent_channels = 16
        latent_rgb_factors = (torch.arange(48, dtype=torch.float32).reshape(16, 3).sin() * 0.3).tolist()
        latent_rgb_factors_bias = [-0.1, 0.05, 0.2]

    modules["comfy.latent_formats"].Wan21 = Wan21

    class LatentPreviewMethod(enum.Enum):
        NoPreviews = "none"
        Auto = "auto"
        Latent2RGB = "latent2rgb"
        TAESD = "taesd"

    modules["comfy.cli_args"].LatentPreviewMethod = LatentPreviewMethod
    modules["comfy.cli_args"].args = types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto, preview_size=256)

    # ------------------------------------------------------------------ folder_paths
    fp = modules["folder_paths"]
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {kind: ([os.path.join(str(models_dir), kind)], {".safetensors"})
                                 for kind in ("diffusion_models", "text_encoders", "vae", "loras")}

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        paths, _ = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path not in paths:
            paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)

    def get_folder_paths(folder_name):
        return fp.folder_names_and_paths[folder_name][0][:]

    def get_filename_list(folder_name):
        paths, extensions = fp.folder_names_and_paths[folder_name]
        found = set()
        for path in paths:
            for root, _, files in os.walk(path):
                for f in files:
                    if not extensions or os.path.splitext(f)[1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/"))
        return sorted(found)

    def get_full_path(folder_name, filename):
        for path in get_folder_paths(folder_name):
            candidate = os.path.join(path, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    def get_full_path_or_raise(folder_name, filename):
        found = get_full_path(folder_name, filename)
        if found is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return found

    for function in (add_model_folder_path, get_folder_paths, get_filename_list, get_full_path,
                     get_full_path_or_raise):
        setattr(fp, function.__name__, function)
    return modules, rec
