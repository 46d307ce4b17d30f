"""`python -m bernini_core generate ...`: the official CLI's flags and case files (spec/bernini.md §5.4, §6.2).

Differences from the official scripts, all additive (`--inputs` batches work as in the official CLI):
* every generation flag defaults to the task's preset (§5.3) instead of one global value, so
  `--task_type t2v` alone reproduces the official per-task settings;
* `--config tiny` (Bernini-R 14B layout), `tiny-1.3b`, `tiny-full` (Bernini-Diffusers v1) or `tiny-full-v2`
  runs on a tiny random checkpoint written on the fly in the official layout: it proves the whole
  pipeline runs; its output is noise;
* `--device`, `--dtype`, `--attention`, `--video_fps`, `--no-offload`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .errors import BerniniError
from .tasks import TASK_NAMES

log = logging.getLogger("bernini.cli")

# Keys a case file may set (official assets/testcases/README.md; cli.py CASE_KEYS).
CASE_KEYS = ("task_type", "guidance_mode", "prompt", "video", "image", "images", "output")
# --config tiny*: a tiny random checkpoint written on the fly in the official layout (output is noise by design).
TINY_CONFIGS = {"tiny": ("renderer", "14b"), "tiny-1.3b": ("renderer", "1.3b"),
                "tiny-full": ("full", "v1"), "tiny-full-v2": ("full", "v2")}

# Flags forwarded to the pipeline call under the same name; None means "use the task preset".
GENERATION_FLAGS = (
    ("neg_prompt", str),
    ("system_prompt", str),
    ("num_frames", int),
    ("max_image_size", int),
    ("height", int),
    ("width", int),
    ("num_inference_steps", int),
    ("guidance_mode", str),
    ("omega_vid", float),
    ("omega_img", float),
    ("omega_txt", float),
    ("omega_tgt", float),
    ("omega_scale", float),
    ("planning_step", int),
    ("vit_txt_cfg", float),
    ("vit_img_cfg", float),
    ("vit_denoising_step", int),
    ("flow_shift", float),
    ("seed", int),
    ("fps", int),
    ("video_fps", float),
    ("eta", float),
    ("momentum", float),
    ("vae_tile_px", int),
    ("vae_tile_overlap_px", int),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bernini_core", description="Bernini / Bernini-R inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image or video")

    g = gen.add_argument_group("model")
    g.add_argument("--config", required=True, help="model directory (Bernini-Diffusers, Bernini-Diffusers-v2, "
                   "Bernini-R-Diffusers, a Wan2.2 base dir with --high/--low_noise_ckpt), or a tiny random checkpoint: "
                   + ", ".join(TINY_CONFIGS))
    g.add_argument("--high_noise_ckpt", default=None, help="high-noise expert checkpoint (split Bernini-R release)")
    g.add_argument("--low_noise_ckpt", default=None, help="low-noise expert checkpoint (split Bernini-R release)")
    g.add_argument("--use_unipc", action=argparse.BooleanOptionalAction, default=True,
                   help="UniPC scheduler (default on; --no-use_unipc = Euler flow fallback)")
    g.add_argument("--use_src_tgt_id", action=argparse.BooleanOptionalAction, default=True,
                   help="source-id rotary embeddings (SA-3D RoPE), default on")
    g.add_argument("--interpolate_src_id", action=argparse.BooleanOptionalAction, default=True,
                   help="spread source ids over [1, max_trained_src_id] when there are more sources")
    g.add_argument("--max_trained_src_id", type=int, default=5)
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    g.add_argument("--dtype", default="bf16", help="weight dtype of the DiT and UMT5: bf16 (official), fp16, fp32")
    g.add_argument("--attention", default="auto", help="attention backend: auto, sdpa, flash, sage")
    g.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only the running model on the GPU (default on)")

    g = gen.add_argument_group("input")
    g.add_argument("--case", default=None, help="JSON case file (keys: %s)" % ", ".join(CASE_KEYS))
    g.add_argument("--inputs", default=None, help="batch: a JSON list or JSONL file of case objects, run with one "
                   "model load (outputs default to <output>_NNN)")
    g.add_argument("--prompt", default=None, help="text prompt / editing instruction")
    g.add_argument("--task_type", default="v2v", choices=TASK_NAMES, help="task (drives presets and system prompt)")
    g.add_argument("--video", nargs="+", default=None, help="source video path(s) (ads2v: source, then reference)")
    g.add_argument("--image", default=None, help="the image to edit (i2i)")
    g.add_argument("--images", nargs="+", default=None, help="reference image path(s)")
    g.add_argument("--output", default="outputs/output.mp4", help="output file (.png for one frame, else .mp4)")

    g = gen.add_argument_group("generation (default: the task preset)")
    for name, kind in GENERATION_FLAGS:
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--norm_threshold", type=float, nargs="+", default=None)
    return parser


def apply_case_file(args: argparse.Namespace) -> None:
    """Merge a case file into args; its values override flags of the same name (official behaviour)."""
    if not args.case:
        return
    path = Path(args.case)
    try:
        case = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BerniniError(f"--case file {str(path)!r} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise BerniniError(f"--case file {str(path)!r} is not valid JSON ({exc}).") from None
    if not isinstance(case, dict):
        raise BerniniError(f"--case file {str(path)!r} must hold a single JSON object.")
    unknown = sorted(set(case) - set(CASE_KEYS))
    if unknown:
        raise BerniniError(f"--case file {str(path)!r} has unsupported keys {unknown}; allowed: {list(CASE_KEYS)}.")
    if not case.get("prompt"):
        raise BerniniError(f"--case file {str(path)!r} must set 'prompt'.")
    base = path.parent
    for key, value in case.items():
        if key in ("video", "images") and value is not None:
            value = [value] if isinstance(value, str) else list(value)
            value = [_relative_to(base, v) for v in value]
        elif key == "image" and value is not None:
            value = _relative_to(base, value)
        setattr(args, key, value)


def _relative_to(base: Path, value: str) -> str:
    """Media paths in a case file may be relative to the case file or to the working directory."""
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p)
    candidate = base / p
    return str(candidate) if candidate.exists() else str(p)


def resolve_config(config: str, workdir: Optional[Path]) -> str:
    if config in TINY_CONFIGS:
        assert workdir is not None
        family, variant = TINY_CONFIGS[config]
        if family == "renderer":
            from .tiny import make_tiny_renderer

            path = make_tiny_renderer(workdir / "Bernini-R-Diffusers", variant=variant, seed=0)
        else:
            from .tiny_full import make_tiny_bernini

            name = "Bernini-Diffusers-v2" if variant == "v2" else "Bernini-Diffusers"
            path = make_tiny_bernini(workdir / name, version=variant, seed=0)
        log.info("tiny random %s checkpoint written to %s (its output is noise by design)", config, path)
        return str(path)
    return config


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {name: getattr(args, name) for name, _ in GENERATION_FLAGS if getattr(args, name) is not None}
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
        try:
            text = path.read_text(encoding="utf-8")
            entries = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                       else json.loads(text))
        except FileNotFoundError:
            raise BerniniError(f"--inputs file {str(path)!r} does not exist.") from None
        except json.JSONDecodeError as exc:
            raise BerniniError(f"--inputs file {str(path)!r} is not valid JSON ({exc}).") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("prompt") for e in entries):
            raise BerniniError(f"--inputs file {str(path)!r} must hold a list of objects that each set 'prompt'.")
        base = path.parent
        for index, entry in enumerate(entries):
            unknown = sorted(set(entry) - set(CASE_KEYS))
            if unknown:
                raise BerniniError(f"--inputs entry {index} has unsupported keys {unknown}; allowed: {list(CASE_KEYS)}.")
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


def run_generate(args: argparse.Namespace) -> list[Path]:
    from .pipeline import BerniniPipeline

    tasks = load_tasks(args)
    written = []
    with tempfile.TemporaryDirectory(prefix="bernini-tiny-") as tmp:
        config = resolve_config(args.config, Path(tmp))
        pipe = BerniniPipeline.from_pretrained(  # loaded once for every run of the batch
            config,
            high_noise_ckpt=args.high_noise_ckpt,
            low_noise_ckpt=args.low_noise_ckpt,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            offload=args.offload,
            use_unipc=args.use_unipc,
            use_src_id_rotary_emb=args.use_src_tgt_id,
            interpolate_src_id=args.interpolate_src_id,
            max_trained_src_id=args.max_trained_src_id,
        )
        for task in tasks:
            video = task.get("video")
            if isinstance(video, list) and len(video) == 1:
                video = video[0]
            kwargs = generation_kwargs(args)
            if task.get("guidance_mode"):
                kwargs["guidance_mode"] = task["guidance_mode"]
            out = pipe(
                task=task.get("task_type") or args.task_type,
                prompt=task["prompt"],
                video=video,
                image=task.get("image"),
                images=task.get("images"),
                output_path=task.get("output") or args.output,
                **kwargs,
            )
            log.info("saved %s (%d frames, %dx%d)", out.output_path, out.frames.shape[0], out.frames.shape[2],
                     out.frames.shape[1])
            print(out.output_path)
            written.append(Path(out.output_path))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
    except BerniniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
