"""A real ComfyUI for the integration suite: the source tarball in ``<repo parent>/shared/comfyui`` (or
$BERNINI_COMFYUI_SHARED) installed by its README's CPU recipe into a cached folder
``~/.cache/comfyui-bernini/comfyui-<sha256[:16] of the tarball>/`` ($BERNINI_COMFYUI_CACHE moves the root):
``ComfyUI/`` (the unpacked source, never written to by the tests: each server gets its own --base-directory) and
``venv/`` (torch 2.13.0 CPU first, torchvision/torchaudio without dependencies, ComfyUI's requirements and this pack's
requirements.txt under the recipe's constraints file, the torchvision/torchaudio shim as sitecustomize, and Ray for
the multi-GPU workflows). A marker file written last says the install is complete; an incomplete one is redone.

Run as a script (``python tests/integration/comfy_install.py``) it installs or reuses the cache and prints the path
and the time taken: `.ci/run` does this before the integration phase.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
MARKER = "install-complete"
TORCH = "torch==2.13.0"  # the CPU build the recipe pins; never an unpinned torch
NO_DEPS = ("torchvision==0.28.0", "torchaudio==2.11.1")
EXTRAS = ("ray>=2.9",)  # the multi-GPU workflows' worker pool (run on CPU with the node's device override)


@dataclass(frozen=True)
class Install:
    root: Path

    @property
    def source(self) -> Path:
        return self.root / "ComfyUI"

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def complete(self) -> bool:
        return (self.root / MARKER).is_file() and self.python.is_file() and (self.source / "main.py").is_file()


def shared_dir() -> Path:
    """Where the ComfyUI tarball and recipe are: $BERNINI_COMFYUI_SHARED, else the project's shared ComfyUI folder (../shared/comfyui)
    beside the repo root or beside one of its parents (a clone may sit deeper than the checkout the project's shared folder is next
    to); the repo root's ../shared/comfyui when none has the tarball."""
    env = os.environ.get("BERNINI_COMFYUI_SHARED")
    if env:
        return Path(env)
    for parent in REPO.parents:
        candidate = parent / "shared" / "comfyui"
        if tarball(candidate) is not None:
            return candidate
    return REPO.parent / "shared" / "comfyui"


def cached_installs() -> list:
    """Complete installs in the cache, newest first: used when no tarball is found (a clone outside the project's
    folder on a machine that installed ComfyUI before)."""
    root = cache_root()
    found = [Install(p) for p in root.glob("comfyui-*")] if root.is_dir() else []
    return sorted((i for i in found if i.complete), key=lambda i: (i.root / MARKER).stat().st_mtime, reverse=True)


def tarball(shared: Optional[Path] = None) -> Optional[Path]:
    found = sorted(glob.glob(str((shared or shared_dir()) / "ComfyUI-*.tar.gz")))
    return Path(found[-1]) if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    env = os.environ.get("BERNINI_COMFYUI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "comfyui-bernini"


def install_for(archive: Path) -> Install:
    return Install(cache_root() / f"comfyui-{_sha256(archive)[:16]}")


def find_install() -> tuple[Optional[Install], str]:
    """The complete cached install for the shared tarball, or (None, why not)."""
    shared = shared_dir()
    archive = tarball(shared)
    if archive is None:
        cached = cached_installs()
        if cached:
            return cached[0], ""
        return None, f"no ComfyUI source tarball (ComfyUI-*.tar.gz) in {shared} (set BERNINI_COMFYUI_SHARED)"
    inst = install_for(archive)
    if not inst.complete:
        return None, (f"ComfyUI is not installed at {inst.root}: run `python tests/integration/comfy_install.py` "
                      "(.ci/run does)")
    return inst, ""


def _run(cmd, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def _unpack(archive: Path, dest: Path) -> None:
    """The tarball's single top folder becomes dest/ComfyUI."""
    tmp = dest / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
    tops = [p for p in tmp.iterdir() if p.is_dir()]
    top = tops[0] if len(tops) == 1 and not (tmp / "main.py").exists() else tmp
    if not (top / "main.py").is_file():
        raise RuntimeError(f"{archive} holds no ComfyUI main.py")
    top.rename(dest / "ComfyUI")
    shutil.rmtree(tmp, ignore_errors=True)


def install(python: str = sys.executable) -> Install:
    """Install (or reuse) ComfyUI for the shared tarball by the README's recipe; the marker is written last."""
    shared = shared_dir()
    archive = tarball(shared)
    if archive is None:
        cached = cached_installs()
        if not cached:
            raise SystemExit(f"no ComfyUI-*.tar.gz in {shared} (set BERNINI_COMFYUI_SHARED) and no cached install")
        print(f"no ComfyUI tarball in {shared}; reusing the cached install {cached[0].root}", flush=True)
        return _refresh(cached[0])
    inst = install_for(archive)
    if inst.complete:
        return _refresh(inst)
    shutil.rmtree(inst.root, ignore_errors=True)
    inst.root.mkdir(parents=True)
    _unpack(archive, inst.root)
    constraints = shared / "constraints-cpu.txt"
    _run([python, "-m", "venv", inst.root / "venv"])
    pip = [inst.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + ["-c", constraints, TORCH])
    _run(pip + ["--no-deps", *NO_DEPS])
    requirements = inst.root / "comfyui-requirements.txt"
    lines = (inst.source / "requirements.txt").read_text().splitlines()
    requirements.write_text("\n".join(line for line in lines
                                      if line.split("=")[0].split("<")[0].split(">")[0].strip().lower()
                                      not in ("torch", "torchvision", "torchaudio")) + "\n")
    _run(pip + ["-r", requirements, "-c", constraints])
    _run(pip + ["-r", REPO / "requirements.txt", *EXTRAS, "-c", constraints])
    site = subprocess.run([str(inst.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    shutil.copy(shared / "cpu_torch_shim" / "sitecustomize.py", Path(site) / "sitecustomize.py")
    _run([inst.python, "-c", "import torch, torchvision, torchaudio, av, gguf, ray; "
          "assert torch.__version__.startswith('2.13.0') and not torch.cuda.is_available(), torch.__version__"])
    (inst.root / MARKER).write_text(f"{archive.name}\n")
    return inst


def _refresh(inst: Install) -> Install:
    """A cached install gets this checkout's requirements (a no-op when nothing changed): the cache is keyed by the
    ComfyUI tarball only."""
    pip = [inst.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    constraints = inst.root / "torch-constraint.txt"
    constraints.write_text(TORCH + "\n")
    _run(pip + ["-r", REPO / "requirements.txt", *EXTRAS, "-c", constraints])
    return inst


if __name__ == "__main__":
    start = time.monotonic()
    inst = install()
    print(f"ComfyUI install: {inst.root} ready in {time.monotonic() - start:.0f} s", flush=True)
