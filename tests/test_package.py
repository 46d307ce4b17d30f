"""Packaging: the pack imports like ComfyUI imports it, without ComfyUI; metadata for Manager and the Registry."""

import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pack_imports_as_comfyui_loads_it_without_comfyui():
    assert "comfy" not in sys.modules
    name = "custom_nodes_x_ComfyUI-Bernini"  # ComfyUI loads a pack under a mangled module name
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert isinstance(module.NODE_DISPLAY_NAME_MAPPINGS, dict)
        assert (ROOT / module.WEB_DIRECTORY).resolve().is_dir()
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    finally:
        sys.modules.pop(name, None)


def test_pyproject_metadata():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] and project["version"] and project["description"]
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project["requires-python"] == ">=3.10"
    torch_deps = [d for d in project["dependencies"] if d.replace(" ", "").lower().startswith("torch")]
    assert torch_deps and all("==" not in d for d in torch_deps)  # never a pin that pulls CUDA wheels
    assert {"pytest", "diffusers"} <= {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["test"]}
    assert "Repository" in project["urls"]
    assert any(d.startswith("comfyui-frontend-package>=") for d in project["dependencies"])  # Registry frontend range
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert comfy["requires-comfyui"].startswith(">=0.")


def test_requirements_and_comfyignore():
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(r.lower().startswith("torch") for r in reqs if r)
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert "tests/" in ignored and "benchmarks/" in ignored


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "python -m bernini_core generate --config tiny" in readme
    assert "<!-- test-command -->" in readme
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
