"""Prepare pyproject.toml for a Comfy Registry publish: move the frontend range into [project].dependencies.

The Registry learns a pack's supported ComfyUI frontend range from a ``comfyui-frontend-package`` entry in
``[project].dependencies`` (comfy-cli ``extract_node_configuration`` reads it and drops it from the published
dependency list). In the repository that entry lives in the ``comfyui`` extra instead, so that a standalone
``pip install`` never downloads the frontend. The publish job (.github/workflows/publish.yml) runs this script on
its own checkout right before publishing; nothing here is committed back.

    python docs/dev/registry_pyproject.py [pyproject.toml]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

FRONTEND = "comfyui-frontend-package"
# comfy-cli's rule for the part after the package name: comma-separated [operator]major.minor.patch[-suffix].
REGISTRY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def frontend_requirement(data: dict) -> str:
    """The frontend requirement of the ``comfyui`` extra, checked against the Registry's version format."""
    found = [r for r in data["project"].get("optional-dependencies", {}).get("comfyui", []) if r.startswith(FRONTEND)]
    if len(found) != 1:
        raise SystemExit(f"pyproject.toml: the 'comfyui' extra must hold exactly one {FRONTEND} requirement")
    spec = found[0].removeprefix(FRONTEND)
    if not all(REGISTRY_VERSION_PART.match(part.strip()) for part in spec.split(",")):
        raise SystemExit(f"pyproject.toml: {found[0]!r} is not in the Registry's format (e.g. '>=1.20.0')")
    return found[0]


def for_registry(text: str) -> str:
    """``text`` with the frontend requirement added as the first entry of [project].dependencies."""
    data = tomllib.loads(text)
    if any(d.startswith(FRONTEND) for d in data["project"]["dependencies"]):
        return text
    requirement = frontend_requirement(data)
    head, sep, tail = text.partition("\ndependencies = [\n")
    if not sep:
        raise SystemExit("pyproject.toml: no multi-line 'dependencies = [' in [project]")
    out = f'{head}{sep}    "{requirement}",\n{tail}'
    assert frontend_requirement(tomllib.loads(out)) == requirement
    return out


def main(argv: list[str]) -> None:
    path = Path(argv[1] if len(argv) > 1 else "pyproject.toml")
    path.write_text(for_registry(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{path}: {frontend_requirement(tomllib.loads(path.read_text(encoding='utf-8')))} in [project].dependencies")


if __name__ == "__main__":
    main(sys.argv)
