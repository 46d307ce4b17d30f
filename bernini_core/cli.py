"""`bernini generate ...` / `python -m bernini_core generate ...`: the official CLI's flags and case files
(docs/official_behaviour.md §5.4, §6.2).

Differences from the official scripts, all additive (`--inputs` batches work as in the official CLI):
* every generation flag defaults to the task's preset (docs/official_behaviour.md §5.1–§5.3) instead of one
  global value, so `--task_type t2v` alone reproduces the official per-task settings;
* `--config tiny` (Bernini-R 14B layout), `tiny-1.3b`, `tiny-full` (Bernini-Diffusers v1) or `tiny-full-v2`
  runs on a tiny random checkpoint written on the fly in the official layout: it proves the whole
  pipeline runs; its output is noise;
* `--device`, `--dtype`, `--attention`, `--video_fps`, `--no-offload`, `--vae_tile_px`, `--lora` (LoRAs merged
  into the experts, bernini_core/lora);
* every input that can be checked without the model (files, output path, task/source/mode combinations,
  numbers, device, attention backend) is checked before the model loads, for every run of a batch;
  a flag the chosen model ignores is named in one warning line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .acceleration.settings import add_speed_arguments, speed_settings_from_args
from .errors import BerniniError
from .progress import TqdmProgress  # light: tqdm itself is imported with the first bar
from .tasks import IGNORED_SETTINGS, NO_GUIDANCE, PRESET_NAMES, SAMPLER_NAMES, TASK_NAMES, get_task

log = logging.getLogger("bernini.cli")

# How the program names itself: the `bernini` console script calls main() as is; `python -m bernini_core`
# (__main__.py) passes its own name.
PROG = "bernini"
MODULE_PROG = "python -m bernini_core"

# Keys a case file may set (official assets/testcases/README.md; cli.py CASE_KEYS).
CASE_KEYS = ("task_type", "guidance_mode", "prompt", "video", "image", "images", "output")
# --config tiny*: a tiny random checkpoint written on the fly in the official layout (output is noise by design):
# (family, variant, the official folder name of that layout; the loaders tell the layout from the files, not the name).
TINY_CONFIGS = {"tiny": ("renderer", "14b", "Bernini-R-Diffusers"),
                "tiny-1.3b": ("renderer", "1.3b", "Bernini-R-1.3B-Diffusers"),
                "tiny-full": ("full", "v1", "Bernini-Diffusers"),
                "tiny-full-v2": ("full", "v2", "Bernini-Diffusers-v2")}

# The closed sets the engine accepts, spelled out here so `--help` needs no torch import
# (tests/test_cli.py checks them against sampling.guidance(_full), runtime.DTYPES and renderer.attention.BACKENDS).
RENDERER_GUIDANCE_MODES = ("rv2v", "v2v", "v2v_chain", "t2v", "r2v_apg", "v2v_apg", "t2v_apg")
FULL_GUIDANCE_MODES = ("vae_txt_vit_wapg", "vae_txt_vit", "rv2v_wapg", "v2v_apg")
GUIDANCE_MODES = RENDERER_GUIDANCE_MODES + tuple(m for m in FULL_GUIDANCE_MODES if m not in RENDERER_GUIDANCE_MODES)
# --guidance_mode also takes "none" (both families: one pass per step, no guidance; docs/fast_sampling.md)
FLAG_CHOICES = {"guidance_mode": GUIDANCE_MODES + (NO_GUIDANCE,), "preset": PRESET_NAMES, "sampler": SAMPLER_NAMES}
DTYPE_CHOICES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "sage")
PE_BACKENDS = ("openai", "local")  # --pe_backend (tests/test_prompt_enhancer.py checks prompt_enhancer.BACKENDS)

PRESET = "default: the task's official preset"
# Flags forwarded to the pipeline call under the same name (None = "use the task preset"), with their help.
GENERATION_FLAGS = (
    ("neg_prompt", str, "negative prompt (default: the task's official one: the Chinese Wan2.2 negative prompt "
                        "for Bernini-R, the release's per-task one for full Bernini)"),
    ("system_prompt", str, "system prompt put before the prompt for UMT5 (default: the task's official one)"),
    ("num_frames", int, "frames to generate, of the form 4n+1 (others are rounded down, with a warning); with a "
                        f"source video, the most frames taken from it ({PRESET}, e.g. 81 for t2v; t2i and i2i "
                        "always render 1)"),
    ("max_image_size", int, "long-edge limit of source videos and images in pixels, at least 16 "
                            f"({PRESET}, e.g. 848; 842 for full-Bernini t2v)"),
    ("height", int, "output height in pixels, a multiple of 16 (Bernini-R rounds others to the nearest with a "
                    "warning, full Bernini refuses them); Bernini-R takes the size of the source video or i2i image "
                    f"instead; full Bernini: 0 = the source video's size ({PRESET}, e.g. 480 for t2v)"),
    ("width", int, f"output width in pixels, as --height ({PRESET}, e.g. 848 for t2v)"),
    ("num_inference_steps", int, f"renderer denoising steps, at least 1 ({PRESET}, e.g. 40 for Bernini-R, 50 for "
                                 "full-Bernini t2v)"),
    ("preset", str, "official = the release's settings per task; fast = for step-distilled experts (e.g. the "
                    "lightx2v 4-step LoRAs): --guidance_mode none, 4 steps, --sampler distill, shift 5.0, the "
                    "low-noise expert from step 2; other flags still override it (default: official)"),
    ("guidance_mode", str, "guidance mode; Bernini-R: " + ", ".join(RENDERER_GUIDANCE_MODES) + "; full Bernini: "
                           + ", ".join(FULL_GUIDANCE_MODES) + f"; both: {NO_GUIDANCE} = one pass per step, no "
                           f"guidance ({PRESET}, e.g. t2v_apg for Bernini-R t2v, vae_txt_vit_wapg for full Bernini)"),
    ("sampler", str, "unipc (official), euler (the official fallback, as --no-use_unipc) or distill (lightx2v's "
                     "step-distill sampler) (default: unipc; distill with --preset fast)"),
    ("boundary_step_index", int, "steps run by the high-noise expert before the low-noise one takes over (default: "
                                 "the timestep rule, t < 875; with --preset fast half the steps rounded up, 2 of 4)"),
    ("omega_vid", float, f"guidance weight of the source-video term ({PRESET}, e.g. 1.25 for Bernini-R)"),
    ("omega_img", float, f"guidance weight of the source-image term ({PRESET}, e.g. 4.5 for Bernini-R)"),
    ("omega_txt", float, f"guidance weight of the text term ({PRESET}, e.g. 4.0 for Bernini-R)"),
    ("omega_tgt", float, f"full Bernini: guidance weight of the planned-target term ({PRESET}, e.g. 0.5 for v1 "
                         "t2v; Bernini-R ignores it)"),
    ("omega_scale", float, f"factor on the omegas from the switch to the low-noise expert on ({PRESET}, e.g. 0.8 "
                           "for Bernini-R)"),
    ("planning_step", int, f"full Bernini: MaskGIT planning steps, at least 1 ({PRESET}: 25 for v1, 50 for v2 "
                           "video tasks; Bernini-R ignores it)"),
    ("vit_txt_cfg", float, "full Bernini: the planner's text guidance (default: 1.2, the official; Bernini-R "
                           "ignores it)"),
    ("vit_img_cfg", float, "full Bernini: the planner's image guidance (default: 1.0, the official; Bernini-R "
                           "ignores it)"),
    ("vit_denoising_step", int, f"full Bernini: ViT-decoder steps per planning step, at least 1 ({PRESET}: 5 for "
                                "v1, 1 for v2 video tasks; Bernini-R ignores it)"),
    ("flow_shift", float, "flow-matching timestep shift, above 0 (default: 5.0, the official)"),
    ("seed", int, "random seed (default: 42, the official; full Bernini takes 0..4294967295)"),
    ("fps", int, "frame rate the source videos are resampled to and the output is written at "
                 "(default: 16, the official)"),
    ("video_fps", float, "frame rate of in-memory source frames (Python API); video files carry their own, so the "
                         "CLI ignores it (default: none)"),
    ("eta", float, "Bernini-R APG modes: weight of the parallel component (default: 0.5, the official; full "
                   "Bernini ignores it)"),
    ("momentum", float, "Bernini-R APG modes: momentum (default: 0.0, the official; full Bernini ignores it)"),
    ("vae_tile_px", int, "tiled VAE to bound memory at 720p and beyond: tile size in pixels, a multiple of 8 and "
                         "at least 16, e.g. 256 (default: 0 = off, as the official; tiling changes the result "
                         "slightly)"),
    ("vae_tile_overlap_px", int, "tiled VAE: tile overlap in pixels, a multiple of 8 below --vae_tile_px "
                                 "(default: 64)"),
)
# Flags the chosen model does not read: one warning each when given (family -> flag -> why).
IGNORED_FLAGS = IGNORED_SETTINGS  # flags the chosen model ignores: one warning line each


def _examples(prog: str) -> str:
    return f"""examples:
  # any machine: a tiny random checkpoint (its output is noise; it proves every stage runs)
  {prog} generate --config tiny --task_type t2v --prompt "a red fox" --num_frames 9 \\
      --height 64 --width 64 --num_inference_steps 4 --output outputs/tiny_t2v.mp4

  # edit a video with full Bernini v2 (every other setting: the task's official preset)
  {prog} generate --config pretrained_models/Bernini-Diffusers-v2 --task_type v2v \\
      --video input.mp4 --prompt "Make it snow" --output outputs/v2v.mp4

  # a batch with one model load: batch.jsonl holds one case per line, e.g.
  #   {{"task_type": "v2v", "prompt": "Make it snow", "video": "input.mp4"}}
  # (outputs without an "output" key go to outputs/batch_000.mp4, _001, ...)
  {prog} generate --config pretrained_models/Bernini-R-Diffusers --inputs batch.jsonl --output outputs/batch.mp4
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description="Bernini / Bernini-R inference.",
                                     epilog=_examples(prog), formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    gen = sub.add_parser("generate", help="generate one image or video (or a batch)", epilog=_examples(prog),
                         description="Generate one image or video, or a batch of them, with one model load.",
                         formatter_class=formatter)

    g = gen.add_argument_group("model")
    g.add_argument("--config", required=True, help="model folder (Bernini-Diffusers, Bernini-Diffusers-v2, "
                   "Bernini-R-Diffusers, Bernini-R-1.3B-Diffusers, a Wan2.2 base folder with "
                   "--high/--low_noise_ckpt), or a tiny random checkpoint: " + ", ".join(TINY_CONFIGS)
                   + " (required)")
    g.add_argument("--high_noise_ckpt", default=None, help="high-noise expert checkpoint of the split Bernini-R "
                   "release (default: none, the experts come from --config)")
    g.add_argument("--low_noise_ckpt", default=None, help="low-noise expert checkpoint of the split Bernini-R "
                   "release (default: none, the experts come from --config)")
    g.add_argument("--use_unipc", action=argparse.BooleanOptionalAction, default=True,
                   help="UniPC scheduler; --no-use_unipc = the Euler flow fallback (default: on, the official)")
    g.add_argument("--use_src_tgt_id", action=argparse.BooleanOptionalAction, default=True,
                   help="Bernini-R: source-id rotary embeddings (SA-3D RoPE); full Bernini always uses them "
                   "(default: on, the official)")
    g.add_argument("--interpolate_src_id", action=argparse.BooleanOptionalAction, default=True,
                   help="spread source ids over [1, max_trained_src_id] when there are more sources "
                   "(default: on, the official)")
    g.add_argument("--max_trained_src_id", type=int, default=5,
                   help="the highest source id seen in training (default: %(default)s, the official)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto = cuda when available, else cpu "
                   "(default: %(default)s)")
    g.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES,
                   help="weight dtype of the DiT, UMT5 and planner; the VAE stays fp32 (default: %(default)s, "
                   "the official)")
    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel of the DiT: auto = FlashAttention on CUDA when installed, else sdpa; "
                   "sage (quantised) only when asked (default: %(default)s)")
    g.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only the running model on the GPU (default: on)")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH[:high|low|both]]",
                   help="merge a LoRA (.safetensors; ComfyUI/original Wan, kohya/musubi, diffusers/PEFT or lightx2v "
                   "diff keys) into the DiT experts at STRENGTH (default 1.0), into the high-noise, low-noise or "
                   "both experts (default: both; a one-expert 1.3B renderer takes high or both); repeat the flag to "
                   "chain LoRAs, e.g. --lora distill_high.safetensors:1:high --lora distill_low.safetensors:1:low "
                   "(default: none)")

    g = gen.add_argument_group("input")
    g.add_argument("--case", default=None, help="JSON case file (keys: %s; default: none)" % ", ".join(CASE_KEYS))
    g.add_argument("--inputs", default=None, help="batch: a JSON list or JSONL file of case objects, run with one "
                   "model load; entries without 'output' write <output>_NNN (default: none)")
    g.add_argument("--prompt", default=None, help="text prompt / editing instruction (default: none; required "
                   "unless --case or --inputs sets it)")
    g.add_argument("--task_type", default="v2v", choices=TASK_NAMES,
                   help="task; drives the presets and the system prompt (default: %(default)s)")
    g.add_argument("--video", nargs="+", default=None, help="source video file(s); ads2v: the source, then the "
                   "reference (default: none)")
    g.add_argument("--image", default=None, help="the image to edit (i2i); r2v and rv2v take it as one more "
                   "reference image (default: none)")
    g.add_argument("--images", nargs="+", default=None, help="reference image file(s) (default: none)")
    g.add_argument("--output", default="outputs/output.mp4", help="output file: one frame is written as an "
                   "image (.png unless another image type is named), several as H.264 .mp4 (default: %(default)s)")
    g.add_argument("--force", action="store_true", help="run settings beyond the sane limits: more than 200 steps, "
                   "or a size whose working memory exceeds this machine's (default: off, such runs are refused)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file; without it an existing "
                   "file is kept and the result goes to the next free numbered name, e.g. output_00001.mp4 "
                   "(default: off)")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no info lines on stderr; warnings, "
                   "errors and the written paths (stdout) still print (default: off: bars for loading, encoding, "
                   "planning, denoising and decoding)")

    g = gen.add_argument_group("multi-GPU (README \"Multi-GPU\"; under torchrun, or started here with --gpus)")
    g.add_argument("--gpus", type=int, default=None, help="start this many processes on this machine, one per GPU "
                   "(with --device cpu: CPU processes, for trying it out), as one run; not needed under torchrun "
                   "(default: one process)")
    g.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel degree: the DiT's tokens are "
                   "split across this many ranks; must divide the head count (40 for A14B, 12 for 1.3B) "
                   "(default: %(default)s, the official flag)")
    g.add_argument("--cfg_parallel", type=int, default=1, help="guidance-arm parallel degree: each step's 2-6 DiT "
                   "passes are spread over this many Ulysses groups (default: %(default)s)")
    g.add_argument("--fsdp", action="store_true", help="also shard each expert's weights over the Ulysses group "
                   "(FSDP2): 1/U of the 14B weights per GPU, for GPUs under ~40 GB; needs --ulysses 2 or more "
                   "(default: off, every GPU holds whole experts)")
    g.add_argument("--parallel_timeout", type=float, default=1800.0, help="seconds a rank waits for the others "
                   "before the run stops with an error naming it (default: %(default)s)")
    g.add_argument("--save_latents", default=None, metavar="FILE.safetensors", help="also write the raw final "
                   "latents (and the settings used, as metadata) to this safetensors file; a batch numbers it per "
                   "run (default: none)")

    g = gen.add_argument_group("generation (default: the task's official preset)")
    for name, kind, text in GENERATION_FLAGS:
        choices = FLAG_CHOICES.get(name)
        g.add_argument(f"--{name}", type=kind, default=None, choices=choices, help=text)
    g.add_argument("--norm_threshold", type=float, nargs="+", default=None,
                   help="Bernini-R APG modes: norm threshold per guidance term (default: 50 50 50, the official; "
                   "full Bernini ignores it)")

    add_speed_arguments(gen)

    g = gen.add_argument_group("prompt enhancer (docs/prompt_enhancer.md)")
    g.add_argument("--use_pe", action="store_true", help="rewrite each prompt for its task before generating, as the "
                   "official --use_pe: the model sees the prompt, 3 frames of each source video and the reference "
                   "images; the prompt used is logged and saved beside the output as <output>.prompt.txt "
                   "(default: off)")
    g.add_argument("--pe_model", default=None, help="the endpoint's model (default: $BERNINI_PE_MODEL, else the "
                   "official gpt-5.4-2026-03-05); key and URL come from BERNINI_PE_API_KEY / OPENAI_API_KEY and "
                   "BERNINI_PE_BASE_URL / OPENAI_BASE_URL, never from a flag")
    g.add_argument("--pe_backend", default=None, choices=PE_BACKENDS, help="openai = an OpenAI-compatible endpoint "
                   "(the official); local = a Qwen2.5-VL on this machine, no network: the full-Bernini planner's own "
                   "model, or --pe_local_model (default: openai)")
    g.add_argument("--pe_local_model", default=None, metavar="DIR", help="--pe_backend local: a Qwen2.5-VL folder "
                   "(e.g. Qwen2.5-VL-7B-Instruct) or a Bernini-Diffusers folder to run instead of the loaded planner "
                   "(default: the planner of a full-Bernini --config)")
    g.add_argument("--pe_max_new_tokens", type=int, default=None, metavar="N", help="--pe_backend local: the most "
                   "tokens the model writes (default: 1024; an enhanced prompt takes about 150-400)")
    return parser


def apply_case_file(args: argparse.Namespace) -> None:
    """Merge a case file into args; its values override flags of the same name (official behaviour)."""
    if not args.case:
        return
    path = Path(args.case)
    case = _read_json_file(path, "--case")
    if not isinstance(case, dict):
        raise BerniniError(f"--case file {str(path)!r} must hold a single JSON object.")
    unknown = sorted(set(case) - set(CASE_KEYS))
    if unknown:
        raise BerniniError(f"--case file {str(path)!r} has unsupported keys {unknown}; allowed: {list(CASE_KEYS)}.")
    if not case.get("prompt"):
        raise BerniniError(f"--case file {str(path)!r} must set 'prompt'.")
    _check_case_types(case, f"--case file {str(path)!r}")
    base = path.parent
    for key, value in case.items():
        if key in ("video", "images") and value is not None:
            value = [value] if isinstance(value, str) else list(value)
            value = [_relative_to(base, v) for v in value]
        elif key == "image" and value is not None:
            value = _relative_to(base, value)
        setattr(args, key, value)


def _check_case_types(case: dict, where: str) -> None:
    """Case-file / batch-entry values: text, and for video / images one path or a list of paths."""
    for key, value in case.items():
        if value is None:
            continue
        many = key in ("video", "images") and isinstance(value, list) and value
        if not (isinstance(value, str) or (many and all(isinstance(v, str) for v in value))):
            kind = "a path or a list of paths" if key in ("video", "images") else "a path" if key == "image" else "text"
            raise BerniniError(f"{where}: '{key}' must be {kind}, got {json.dumps(value)}.")


def _relative_to(base: Path, value: str) -> str:
    """A relative media path in a case / batch file: beside that file first, else the working directory (a path
    found in neither stays as written, and the error says where it was looked for)."""
    p = Path(value)
    if p.is_absolute():
        return str(p)
    candidate = base / p
    return str(candidate) if candidate.exists() else str(p)


def _read_json_file(path: Path, flag: str):
    """The parsed JSON (or JSON-lines) of a --case / --inputs file, or one clear error naming the file."""
    if path.is_dir():
        raise BerniniError(f"{flag} {str(path)!r} is a folder, not a JSON file.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BerniniError(f"{flag} file {str(path)!r} does not exist.") from None
    except UnicodeDecodeError:
        raise BerniniError(f"{flag} file {str(path)!r} is not UTF-8 text; save it as UTF-8 JSON.") from None
    except OSError as exc:
        raise BerniniError(f"{flag} file {str(path)!r} cannot be read ({exc.strerror}).") from None
    try:
        if flag == "--inputs" and path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BerniniError(f"{flag} file {str(path)!r} is not valid JSON ({exc}).") from None


def resolve_config(config: str, workdir: Optional[Path]) -> str:
    if config in TINY_CONFIGS:
        assert workdir is not None
        family, variant, folder = TINY_CONFIGS[config]
        if family == "renderer":
            from .tiny import make_tiny_renderer

            path = make_tiny_renderer(workdir / folder, variant=variant, seed=0)
        else:
            from .tiny_full import make_tiny_bernini

            path = make_tiny_bernini(workdir / folder, version=variant, seed=0)
        log.info("--config %s: tiny random checkpoint in the %s layout written to %s (its output is noise by "
                 "design)", config, folder, path)
        return str(path)
    return config


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {name: getattr(args, name) for name, _, _ in GENERATION_FLAGS if getattr(args, name) is not None}
    if args.norm_threshold is not None:
        kwargs["norm_threshold"] = tuple(args.norm_threshold)
    return kwargs


def load_tasks(args: argparse.Namespace) -> list[dict]:
    """The runs to make: one from the flags (or --case), or every entry of an --inputs JSON list / JSONL file
    (official `load_tasks`; entry keys as in case files, task_type defaulting to --task_type)."""
    if args.inputs:
        if args.case:
            raise BerniniError("--case (one example) and --inputs (a batch) cannot be combined.")
        path = Path(args.inputs)
        entries = _read_json_file(path, "--inputs")
        if entries == []:
            raise BerniniError(f"--inputs file {str(path)!r} holds no entries: nothing to do.")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("prompt") for e in entries):
            raise BerniniError(f"--inputs file {str(path)!r} must hold a list of objects that each set 'prompt'.")
        base = path.parent
        for index, entry in enumerate(entries):
            unknown = sorted(set(entry) - set(CASE_KEYS))
            if unknown:
                raise BerniniError(f"--inputs entry {index} has unsupported keys {unknown}; allowed: {list(CASE_KEYS)}.")
            _check_case_types(entry, f"--inputs entry {index}")
            for key in ("video", "images"):
                if entry.get(key) is not None:
                    value = [entry[key]] if isinstance(entry[key], str) else list(entry[key])
                    entry[key] = [_relative_to(base, v) for v in value]
            if entry.get("image") is not None:
                entry["image"] = _relative_to(base, entry["image"])
            entry.setdefault("output", str(Path(args.output).with_name(f"{Path(args.output).stem}_{index:03d}"
                                                                      f"{Path(args.output).suffix}")))
        return entries
    apply_case_file(args)
    if not args.prompt:
        raise BerniniError("provide --prompt (or a --case file that sets 'prompt', or --inputs for a batch).")
    return [{"prompt": args.prompt, "task_type": args.task_type, "video": args.video, "image": args.image,
             "images": args.images, "output": args.output, "guidance_mode": args.guidance_mode}]


# ------------------------------------------------------------------------------------------ checks before loading
def model_family(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """("renderer" | "full", full-Bernini release or None) of --config, from its config.json and folder listing
    only: the same choice `BerniniPipeline.from_pretrained` makes, without reading weights."""
    if args.config in TINY_CONFIGS:
        family, variant, _ = TINY_CONFIGS[args.config]
        return family, (variant if family == "full" else None)
    from .pipeline import BerniniPipeline

    pipeline_class = BerniniPipeline.pipeline_class(args.config, high_noise_ckpt=args.high_noise_ckpt,
                                                    low_noise_ckpt=args.low_noise_ckpt)
    if pipeline_class.family != "bernini":
        return "renderer", None
    from .checkpoints import read_json
    from .loaders_full import detect_version

    return "full", detect_version(args.config, read_json(Path(args.config) / "config.json"))[0]


def check_runs(args: argparse.Namespace, runs: list[dict], family: str, version: Optional[str]) -> None:
    """Everything that can be checked without the model, for every run, before the model loads: the device and
    attention backend, each run's task, files, sources, guidance mode, numbers and output path. Flags the model
    ignores get one warning line each."""
    from .renderer.attention import check_backend
    from .runtime import resolve_device

    resolve_device(args.device)
    check_backend(args.attention)
    for name, why in IGNORED_FLAGS[family].items():
        if getattr(args, name) is not None:
            log.warning("--%s is ignored: %s.", name, why)
    if family == "full" and not args.use_src_tgt_id:
        log.warning("--no-use_src_tgt_id is ignored: full Bernini always uses source-id RoPE (the official "
                    "pipeline hard-codes it).")
    if args.video_fps is not None:
        log.warning("--video_fps is ignored: video files carry their own frame rate (video_fps is for in-memory "
                    "frames in the Python API).")
    planned: dict[Path, int] = {}
    for index, run in enumerate(runs):
        prefix = f"--inputs entry {index}: " if args.inputs else ""
        try:
            target = _check_run(args, run, family, version, prefix)
        except BerniniError as exc:
            raise BerniniError(prefix + str(exc)) from None
        # two runs of one batch must not write one file (numbering would hide it, --overwrite would lose one)
        key = target.resolve()
        if key in planned:
            raise BerniniError(f"--inputs entries {planned[key]} and {index} both write {str(target)!r}; give each "
                               "entry its own 'output'.")
        planned[key] = index


def _as_list(value) -> list:
    return [] if value is None else ([value] if isinstance(value, str) else list(value))


def _check_run(args, run: dict, family: str, version: Optional[str], prefix: str) -> Path:
    """Check one run; returns the output path it aims at (after the image/video extension rule)."""
    from . import media
    from .denoise import check_scheduler
    from .pipeline import vae_tiling
    from .memory_estimate import check_fits
    from .runtime import resolve_device
    from .tasks import (bernini_preset, check_mode_sources, check_sources, ignored_by_mode, renderer_preset,
                        resolve_settings)

    task = run.get("task_type") or args.task_type
    spec = get_task(task)
    from .tasks import check_text

    check_text(run.get("prompt"), "prompt", required=True)
    videos, image, refs = _as_list(run.get("video")), run.get("image"), _as_list(run.get("images"))

    # files (a case file's or batch's relative paths are read from its folder or the working directory)
    for key, paths in (("video", videos), ("image", _as_list(image)), ("images", refs)):
        for path in paths:
            if not Path(path).is_file():
                state = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
                where = ""
                if (args.case or args.inputs) and not Path(path).is_absolute():
                    where = (f" (looked for beside the {'case' if args.case else '--inputs'} file and in the working "
                             "directory)")
                raise BerniniError(f"--{key} file {str(path)!r} {state}{where}; check the path.")
            if key == "video":
                media.check_video_file(path)
            else:
                media.check_image_file(path)

    # sources: r2v/rv2v take a single --image as a reference (gradio routing, docs/official_behaviour.md §6.3);
    # full Bernini's i2i edits one image
    has_image = image is not None
    if task in ("r2v", "rv2v") and has_image:
        refs, has_image = [image] + refs, False
    check_sources(spec, n_videos=len(videos), has_image=has_image, n_images=len(refs))
    if family == "full" and task == "i2i" and refs:
        raise BerniniError("full Bernini i2i edits one image: pass --image without reference --images.")

    # the settings the pipeline will use: the task preset, then the flags, then the entry's guidance_mode
    overrides = generation_kwargs(args)
    if run.get("guidance_mode"):
        overrides["guidance_mode"] = run["guidance_mode"]
    preset = renderer_preset(task) if family == "renderer" else bernini_preset(task, version)
    settings = resolve_settings(preset, overrides, force=args.force)

    mode = settings["guidance_mode"]
    if family == "renderer":
        from .sampling.guidance import RendererGuidance as Guidance
    else:
        from .sampling.guidance_full import FullGuidance as Guidance
    check_scheduler(Guidance(mode), mode, args.use_unipc, settings.get("sampler"))
    for name in ignored_by_mode(settings, overrides):
        log.warning("%s--%s is ignored: --guidance_mode none runs one pass per step and reads no guidance weights.",
                    prefix, name)
    check_mode_sources(mode, n_videos=len(videos), n_images=len(refs) + int(has_image), task=task,
                       where="--guidance_mode")

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise BerniniError(f"--{name} {settings[name]}: {rule}.")

    # counts, ranges and types: resolve_settings (tasks.check_numbers); full Bernini's narrower seed range here
    if family == "full":
        need(0 <= settings["seed"] <= 2**32 - 1, "seed", "full Bernini's planner seeds numpy, which takes "
             "0..4294967295")
    vae_tiling(settings)

    # size: Bernini-R takes it from the first source video or the image to edit; full Bernini from a source
    # video when height/width are 0 (docs/official_behaviour.md §4.8)
    height, width = int(settings["height"] or 0), int(settings["width"] or 0)
    if family == "renderer":
        sized_by = "the source video" if videos else "the image to edit" if has_image else None
    else:
        sized_by = "the source video" if videos and not spec.single_frame else None
    if height < 0 or width < 0 or (sized_by is None and (height <= 0 or width <= 0)):
        raise BerniniError(f"height/width must be positive when no source fixes the size, got {height}x{width}; "
                           "pass --height and --width (multiples of 16).")
    if family == "full" and (height % 16 or width % 16):
        raise BerniniError(f"full Bernini needs height/width in multiples of 16, got {height}x{width}; pass e.g. "
                           f"--height {max(16, round(height / 16) * 16)} --width {max(16, round(width / 16) * 16)}.")
    if sized_by is None:  # the settings fix the size: its working memory can be checked now
        check_fits(1 if spec.single_frame else int(settings["num_frames"]), height, width,
                   resolve_device(args.device), force=args.force)
    if family == "renderer" and sized_by and (args.height is not None or args.width is not None):
        log.warning("%s--height/--width are ignored: Bernini-R takes the output size from %s (the official rule).",
                    prefix, sized_by)
    if spec.single_frame and args.num_frames is not None and args.num_frames != 1:
        log.warning("%s--num_frames %d is ignored: %s renders one frame.", prefix, args.num_frames, task)

    # output: writable, and a container that can hold the result
    output = run.get("output") or args.output
    media.check_output_path(output)
    if not spec.single_frame and Path(output).suffix.lower() == ".webm":  # media.save_output refuses it too
        raise BerniniError(f"output {str(output)!r}: WebM cannot hold H.264 video; use a .mp4 path.")
    return media.planned_output(output, 1 if spec.single_frame or settings["num_frames"] == 1 else 2)


@contextlib.contextmanager
def transformers_progress_bars_off() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Loading checkpoint shards") off for our loads, and
    back to what they were after: no process-wide setting is left behind, and Hugging Face Hub's bars (downloads)
    are not touched."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    if not hasattr(hf_logging, "_tqdm_active"):  # another transformers layout: leave its bars alone
        yield
        return
    previous = hf_logging.is_progress_bar_enabled()
    hf_logging._tqdm_active = False  # what disable_progress_bar() sets, without also switching off the Hub's bars
    try:
        yield
    finally:
        hf_logging._tqdm_active = previous


@contextlib.contextmanager
def progress_bars(quiet: bool) -> Iterator[Optional[TqdmProgress]]:
    """tqdm bars on stderr for one `generate` (None with --quiet); meanwhile log lines print above the bars
    instead of through them, and an error closes the open bar first."""
    if quiet:
        yield None
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), TqdmProgress() as bars:
        yield bars


def run_generate(args: argparse.Namespace) -> list[Path]:
    from .parallel.launch import distributed_env, launch_local

    tasks = load_tasks(args)
    family, version = model_family(args)
    check_runs(args, tasks, family, version)  # before the model loads: a typo costs nothing
    from .prompt_enhancer.cli import check_flags as check_prompt_enhancer_flags

    check_prompt_enhancer_flags(args, family)  # --use_pe: a key for the endpoint, a Qwen2.5-VL for the local one
    args.lora_specs = check_cli_loras(args)
    env = distributed_env()
    check_parallel_flags(args, env)
    args.speed_settings = speed_settings_from_args(
        args, multi_process=(env is not None and env.world_size > 1) or (args.gpus or 1) > 1)
    if args.gpus and env is None:  # start the ranks here; each runs this command under the launcher's environment
        launch_local(args.gpus, args.argv, device=args.device, timeout_s=args.parallel_timeout)
        return []

    with tempfile.TemporaryDirectory(prefix="bernini-tiny-") as tmp:
        config = resolve_config(args.config, Path(tmp))
        parallel, device = join_parallel_run(args, env, config) if env is not None else (None, args.device)
        runs = list(enumerate(tasks))  # (index in the batch, entry): names and "run i/N" use the batch index
        if parallel is not None:
            runs = runs[parallel.dp_rank::parallel.dp_size]  # the official data-parallel split
        leader = parallel is None or parallel.is_replica_leader
        if not leader:  # one rank per group writes files, logs and shows progress
            logging.getLogger("bernini").setLevel(logging.WARNING)
        with progress_bars(getattr(args, "quiet", False) or not leader) as bars:
            written = _generate(args, config, runs, len(tasks), device, parallel, bars, leader)
    return written


def check_cli_loras(args: argparse.Namespace) -> list:
    """The --lora flags as LoraSpec objects, each file checked to be a readable LoRA, before the model loads."""
    if not args.lora:
        return []
    from .lora import check_loras, parse_lora_arg

    return check_loras([parse_lora_arg(text) for text in args.lora])


def check_parallel_flags(args: argparse.Namespace, env) -> None:
    """The multi-process flags, before anything loads or starts."""
    from .parallel import ParallelConfig

    for name in ("gpus", "ulysses", "cfg_parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BerniniError(f"--{name} {value}: must be at least 1.")
    if args.parallel_timeout <= 0:
        raise BerniniError(f"--parallel_timeout {args.parallel_timeout}: must be a positive number of seconds.")
    world = env.world_size if env is not None else (args.gpus or 1)
    groups = args.ulysses * args.cfg_parallel
    if world == 1 and groups > 1:
        raise BerniniError(f"--ulysses {args.ulysses} / --cfg_parallel {args.cfg_parallel} need {groups} processes; "
                           f"start them with --gpus {groups} or torchrun --nproc-per-node {groups}.")
    if world % groups:
        raise BerniniError(f"{world} process(es) cannot be split into groups of --ulysses {args.ulysses} × "
                           f"--cfg_parallel {args.cfg_parallel} = {groups}; use a process count that is a multiple "
                           f"of {groups}, or other degrees.")
    config = ParallelConfig(ulysses=args.ulysses, cfg=args.cfg_parallel, dp=world // groups)
    heads = dit_heads(args)
    config.check(heads=heads, world_size=world)
    if args.fsdp:
        from .parallel.fsdp import check_fsdp

        check_fsdp(config)
    if args.save_latents:
        from . import media

        if not args.save_latents.endswith(".safetensors"):
            raise BerniniError(f"--save_latents {args.save_latents!r}: the file must end in .safetensors.")
        media.check_output_path(args.save_latents)


def dit_heads(args: argparse.Namespace) -> Optional[int]:
    """The DiT's attention-head count from its config file (no weights read), or None where only the weights tell
    (a single-file expert); the Ulysses degree must divide it."""
    if args.config in TINY_CONFIGS:
        from .tiny import TINY_DIT
        from .tiny_full import TINY_FULL_DIT

        return (TINY_FULL_DIT if TINY_CONFIGS[args.config][0] == "full" else TINY_DIT)["num_attention_heads"]
    from .loaders import read_dit_config

    base = Path(args.config)
    for candidate in (base / "transformer" / "config.json", base / "transformer_config.json"):
        if candidate.is_file():
            return read_dit_config(candidate).num_attention_heads
    return None


def join_parallel_run(args: argparse.Namespace, env, config_path: str):
    """Under torchrun / --gpus: this rank's device, the process group, and the groups of the layout."""
    from .parallel import ParallelConfig, ParallelState
    from .parallel.launch import init_process_group, rank_device

    device = rank_device(args.device, env.local_rank)
    init_process_group(device, args.parallel_timeout)
    groups = args.ulysses * args.cfg_parallel
    state = ParallelState.build(ParallelConfig(ulysses=args.ulysses, cfg=args.cfg_parallel,
                                               dp=env.world_size // groups),
                                timeout=timedelta(seconds=args.parallel_timeout))
    if state.rank == 0:
        log.info("multi-process run: %s", state.describe())
    return state, str(device)


def _generate(args, config, runs, count, device, parallel, bars, leader) -> list[Path]:
    from .pipeline import BerniniPipeline

    written = []
    with transformers_progress_bars_off():
        pipe = BerniniPipeline.from_pretrained(  # loaded once for every run of the batch
            config,
            high_noise_ckpt=args.high_noise_ckpt,
            low_noise_ckpt=args.low_noise_ckpt,
            device=device,
            parallel=parallel,
            fsdp=args.fsdp,
            loras=getattr(args, "lora_specs", None) or None,
            speed=getattr(args, "speed_settings", None),
            dtype=args.dtype,
            attention=args.attention,
            offload=args.offload,
            use_unipc=args.use_unipc,
            use_src_id_rotary_emb=args.use_src_tgt_id,
            interpolate_src_id=args.interpolate_src_id,
            max_trained_src_id=args.max_trained_src_id,
            progress=bars,
        )
    enhancer = None
    if getattr(args, "use_pe", False) and leader:  # the prompt is encoded on the leader only
        from .prompt_enhancer.cli import CliEnhancer

        enhancer = CliEnhancer(args, pipe, config)
    for index, task in runs:
        if bars is not None and count > 1:
            bars.prefix = f"run {index + 1}/{count} "  # which run of the batch each bar belongs to
        video = task.get("video")
        if isinstance(video, list) and len(video) == 1:
            video = video[0]
        kwargs = generation_kwargs(args)
        if task.get("guidance_mode"):
            kwargs["guidance_mode"] = task["guidance_mode"]
        prompt = enhancer.enhance(task, args.task_type) if enhancer is not None else task["prompt"]
        out = pipe(
            task=task.get("task_type") or args.task_type,
            prompt=prompt,
            video=video,
            image=task.get("image"),
            images=task.get("images"),
            output_path=task.get("output") or args.output,
            overwrite=args.overwrite,
            force=args.force,
            progress=bars,
            **kwargs,
        )
        if not leader:  # the group leader decoded and wrote this run
            continue
        n_frames = out.frames.shape[0]
        log.info("saved %s (%d frame%s, %dx%d)", out.output_path, n_frames, "" if n_frames == 1 else "s",
                 out.frames.shape[2], out.frames.shape[1])
        print(out.output_path, flush=True)  # stdout, bars or not: scripts read the paths from there
        written.append(Path(out.output_path))
        if enhancer is not None:  # the prompt used: beside the output, and in the settings --save_latents keeps
            print(enhancer.record(out, task["prompt"], prompt), flush=True)
        if args.save_latents:
            from . import media

            saved = media.save_latents(out.latents, _numbered(args.save_latents, index, count),
                                       out.settings, overwrite=args.overwrite)
            log.info("saved the final latents to %s", saved)
            print(saved, flush=True)
    return written


def _numbered(path: str, index: int, count: int) -> str:
    """One latents file per run of a batch: FILE_000.safetensors, FILE_001..., as batch outputs are named."""
    if count == 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}_{index:03d}{p.suffix}"))


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """The `bernini` console script (prog "bernini"); `python -m bernini_core` passes its own prog."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser(prog).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus relaunches in each rank
    engine_log = logging.getLogger("bernini")
    level = engine_log.level
    if getattr(args, "quiet", False):
        engine_log.setLevel(logging.WARNING)  # --quiet: warnings and errors only; restored for in-process callers
    from .parallel.launch import distributed_env

    env = distributed_env()
    try:
        if args.command == "generate":
            run_generate(args)
    except BerniniError as exc:
        print(f"error: {exc}" if env is None else f"error: rank {env.rank}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a failed collective (gloo) in a multi-process run; anything else is a bug
        if env is None or not _is_collective_error(exc):
            raise
        from .parallel.launch import describe_collective_error

        print(f"error: {describe_collective_error(exc, env.rank)}", file=sys.stderr)
        return 3
    finally:
        engine_log.setLevel(level)
        _leave_process_group()
    return 0


def _is_collective_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in str(exc).lower() or \
        "nccl" in str(exc).lower() or "connection" in str(exc).lower()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
