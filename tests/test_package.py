"""Packaging: the pack imports like ComfyUI imports it, without ComfyUI; metadata for Manager and the Registry."""

import importlib.util
import runpy
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the test extra installs tomli
    import tomli as tomllib

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
    # The frontend (120 MB of web assets ComfyUI brings itself) is never pulled by an install of this package ...
    assert not any(d.startswith("comfyui-frontend-package") for d in project["dependencies"])
    assert project["optional-dependencies"]["comfyui"] == ["comfyui-frontend-package>=1.20.0"]
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


def test_the_registry_publish_job_declares_the_frontend_range():
    # ... but the Registry reads the range from [project].dependencies: the publish job moves it there.
    tool = runpy.run_path(str(ROOT / "docs" / "dev" / "registry_pyproject.py"))
    text = (ROOT / "pyproject.toml").read_text()
    published = tomllib.loads(tool["for_registry"](text))
    frontend = [d for d in published["project"]["dependencies"] if d.startswith("comfyui-frontend-package")]
    assert frontend == ["comfyui-frontend-package>=1.20.0"]
    # comfy-cli keeps the part after the name only when every comma-separated part matches its pattern
    assert all(tool["REGISTRY_VERSION_PART"].match(p) for p in frontend[0].removeprefix("comfyui-frontend-package").split(","))
    assert not tool["REGISTRY_VERSION_PART"].match(">=1.20; extra == 'comfyui'")  # the pattern can fail
    unchanged = tomllib.loads(text)
    published["project"]["dependencies"].remove(frontend[0])
    assert published == unchanged  # nothing else changes
    assert tool["for_registry"](tool["for_registry"](text)) == tool["for_registry"](text)
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "docs/dev/registry_pyproject.py" in workflow and "publish-node-action" in workflow
