"""Every file of the repository cites only what the repository holds.

A contributor must be able to follow every reference, so no file may point at material that lives outside the
repository (a team-internal spec, design note or brief). Rules, applied line by line to every text file that git
lists (tracked, plus untracked files that are not ignored; a plain directory walk when git is unavailable),
except LICENSE and binary files:

1. Cited paths. A run of path characters (letters, digits, ``_ . - /``) is a cited path when

   * it has a ``/`` and its first component is a top-level directory of this repository (``bernini_core``,
     ``tests``, ``docs``, ...) or one of the out-of-repository folders the team used to cite (``spec``,
     ``briefs``, ``shared``): it must exist, relative to the repository root (``tests/workflow_tools.name``
     also counts as ``name`` inside ``tests/workflow_tools.py``);
   * it has no ``/`` and is a Markdown file name (a stem, then the Markdown suffix): it must exist at the root
     or beside the citing file.

   Not citations: a run whose first component is anything else (another project's path such as the official
   ``bernini/pipeline.py``, ComfyUI's ``comfy/lora.py``, user paths like ``models/bernini/x``), a run that starts
   with ``/`` (absolute paths, the tail of a URL) or follows one of ``: @ } >``, and a run followed by one of
   ``< { * [ $`` (a pattern such as ``workflows/*.json``). A run ending in ``/`` names a directory. A path that
   ``.gitignore`` ignores is a build output some script creates (CI's virtual environment), not a citation.
   Files of other repositories whose paths look like ours (the official repository's own docs folder) are
   allowed only from FOREIGN_PATHS and only on a line that says whose file it is (``official`` or the
   repository name).

2. Section signs. Every section sign (U+00A7) must be followed by a section number and preceded, on the same
   line, by the Markdown file it refers to (the nearest one to its left), except inside the Markdown files under
   ``docs/``, where a bare sign means a section of the same document. The file must be a document under
   ``docs/`` and have a heading with that number (``## 3.`` for section 3, ``### 3.5 Title`` for section 3.5).
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders outside the repository that old comments cited: always an error, so they count as "ours" to be checked.
EXTERNAL_ROOTS = frozenset({"spec", "briefs", "shared"})
# Files of other repositories whose paths start with one of our top-level names; the value is the marker a line
# must contain (case-insensitive) for the mention to count as foreign.
FOREIGN_PATHS = {
    "docs/bernini.md": ("official", "bytedance/bernini"),
    "docs/bernini_r.md": ("official", "bytedance/bernini"),
}
SKIP_NAMES = frozenset({"LICENSE"})
WALK_SKIP_DIRS = frozenset({".git"})  # besides what .gitignore ignores

SECTION_SIGN = "\u00a7"
MARKDOWN = ".md"

_PATH_RUN = re.compile(r"[\w./-]+")
_PATTERN_NEXT = frozenset("<{*[$")
_PATTERN_BEFORE = frozenset(":@}>")
_SECTION = re.compile(SECTION_SIGN + r"\s*(\d+(?:\.\d+)*)")
_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?:\s|$)")


# ------------------------------------------------------------------------------------------------- files
def repository_files(root: Path = ROOT) -> list[Path]:
    """Repository-relative paths of the files to check: git's list when git works, else a directory walk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True, timeout=60).stdout
        names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    except (OSError, subprocess.SubprocessError):
        names, patterns = [], _ignore_patterns(root)
        for folder, dirs, files in os.walk(root):
            rel = Path(folder).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirs[:] = [d for d in dirs if d not in WALK_SKIP_DIRS and not gitignored(prefix + d, patterns)]
            names += [prefix + f for f in files if not gitignored(prefix + f, patterns)]
    return [Path(n) for n in sorted(names) if (root / n).is_file() and Path(n).name not in SKIP_NAMES]


def read_text(path: Path):
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def top_level_dirs(files, root: Path = ROOT) -> frozenset:
    return frozenset(f.parts[0] for f in files if len(f.parts) > 1 and (root / f.parts[0]).is_dir())


@lru_cache(maxsize=None)
def _doc_sections(path: Path) -> frozenset:
    text = read_text(path) or ""
    return frozenset(m.group(1) for line in text.splitlines() if (m := _HEADING.match(line)))


def _is_our_doc(rel: str) -> bool:
    return rel.startswith("docs/") and rel.endswith(MARKDOWN)


@lru_cache(maxsize=None)
def _default_roots(root: Path) -> frozenset:
    return top_level_dirs(repository_files(root), root)


# ------------------------------------------------------------------------------------------------- rules
def _path_runs(line: str):
    """(start, end, path) of each run of path characters, cleaned of sentence punctuation."""
    for m in _PATH_RUN.finditer(line):
        start, end, token = m.start(), m.end(), m.group()
        while token and token[-1] in ".-" and not token.endswith(("./", "../")):
            token, end = token[:-1], end - 1
        if token.startswith("./"):
            token, start = token[2:], start + 2
        if token:
            yield start, end, token


def _exists(root: Path, token: str) -> bool:
    """The path exists, or it is ``module.attribute`` of an existing ``module.py``."""
    if (root / token).exists():
        return True
    head, _, tail = token.rpartition("/")
    module = tail.split(".")[0]
    return "." in tail and bool(module) and (root / head / (module + ".py")).is_file()


@lru_cache(maxsize=None)
def _ignore_patterns(root: Path) -> tuple:
    path = root / ".gitignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return tuple(line.strip() for line in lines if line.strip() and line.strip()[0] not in "#!")


def gitignored(token: str, patterns) -> bool:
    """Whether a path falls under one of the .gitignore `patterns` (the plain subset: globs, a leading or inner
    ``/`` anchors to the root, a trailing ``/`` names a directory; negations are not supported)."""
    parts = [p for p in token.split("/") if p]
    for pattern in patterns:
        body = pattern.strip("/")
        anchored = "/" in pattern.rstrip("/")
        for k in range(1, len(parts) + 1):
            if fnmatch.fnmatchcase("/".join(parts[:k]) if anchored else parts[k - 1], body):
                return True
    return False


def _is_markdown_name(token: str) -> bool:
    return token.lower().endswith(MARKDOWN) and not token.startswith(".") and len(token) > len(MARKDOWN)


def problems_in_text(text: str, source: str, roots=None, root: Path = ROOT) -> list[str]:
    """Every broken citation of `text`, as it would be read from the repository file `source`."""
    roots = (_default_roots(root) if roots is None else frozenset(roots)) | EXTERNAL_ROOTS
    here = (root / source).parent
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        lowered = line.lower()
        md_refs = []  # (end position, repository-relative path, or None when already reported)
        for start, end, token in _path_runs(line):
            before = line[start - 1] if start else ""
            after = line[end] if end < len(line) else ""
            if token.startswith("/") or before in _PATTERN_BEFORE or after in _PATTERN_NEXT:
                continue
            parts = token.split("/")
            if len(parts) > 1 and parts[0] in roots and not (
                    token in FOREIGN_PATHS and any(marker in lowered for marker in FOREIGN_PATHS[token])):
                if gitignored(token, _ignore_patterns(root)):
                    continue  # a build output a script creates (e.g. CI's virtual environment), not a citation
                resolved = token.rstrip("/") if _exists(root, token) else None
            elif len(parts) == 1 and _is_markdown_name(token):
                found = [p for p in (root / token, here / token) if p.is_file()]
                resolved = found[-1].relative_to(root).as_posix() if found else None
            else:  # another project's file: not checked, but a section sign after it does not refer to our docs
                if _is_markdown_name(parts[-1]):
                    md_refs.append((end, "(foreign) " + token))
                continue
            if resolved is None:
                problems.append(f"{where}: cites {token!r}, which is not in the repository")
            if _is_markdown_name(parts[-1]):
                md_refs.append((end, resolved))
        for m in re.finditer(SECTION_SIGN, line):
            cited = _SECTION.match(line, m.start())
            if not cited:
                problems.append(f"{where}: a section sign without a section number")
                continue
            section = SECTION_SIGN + cited.group(1)
            left = [ref for end, ref in md_refs if end <= m.start()]
            if left:
                doc = left[-1]
                if doc is None:
                    continue  # the missing file is reported above
            elif _is_our_doc(source):
                doc = source
            else:
                problems.append(f"{where}: {section} names no document on its line (cite it as "
                                f"'docs/<file>{MARKDOWN} {section}')")
                continue
            if not _is_our_doc(doc):
                problems.append(f"{where}: {section} refers to {doc!r}, which is not a document under docs/")
            elif cited.group(1) not in _doc_sections(root / doc):
                problems.append(f"{where}: {doc} has no section {cited.group(1)}")
    return problems


# ------------------------------------------------------------------------------------------------- tests
def test_every_citation_resolves_inside_the_repository():
    files = repository_files()
    assert files, "no files found"
    roots = top_level_dirs(files)
    assert {"bernini_core", "tests", "docs"} <= roots
    problems = []
    for rel in files:
        text = read_text(ROOT / rel)
        if text is not None:
            problems.extend(problems_in_text(text, rel.as_posix(), roots))
    assert not problems, "citations of things that are not in the repository:\n" + "\n".join(problems)


# Synthetic texts (assembled from pieces, so this file does not cite them itself).
_S = SECTION_SIGN
EXAMPLE = "bernini_core" + "/example.py"  # the synthetic texts are read as if they were in this file
_BAD = {
    "an external spec": "see " + "spec" + "/bernini.md " + _S + "3.5",
    "a bare external md": "(" + "design" + ".md " + _S + "6)",
    "a bare section sign": "the skip quirk (" + _S + "11.2)",
    "a section sign after a non-doc": "README" + ".md " + _S + "1",
    "a missing section": "docs/official_behaviour.md " + _S + "99.9",
    "a missing file of ours": "tests/" + "test_does_not_exist.py",
    "a missing doc": "docs/" + "no_such_doc" + ".md",
    "a missing module attribute": "tests/" + "no_such_module.attribute",
    "a brief": "briefs" + "/node_contract.md",
    "a foreign doc without a marker": "as " + "docs/" + "bernini" + ".md says",
    "a sign without a number": "docs/official_behaviour.md " + _S + " above",
    "a section of another project's doc": "`assets/testcases/README" + ".md` " + _S + "2",
}
_GOOD = {
    "our doc and section": "docs/official_behaviour.md " + _S + "3.5, " + _S + "7.1 item 2",
    "a range": "(docs/official_behaviour.md " + _S + "4.2–" + _S + "4.7; docs/wan_qwen.md " + _S + "1.3)",
    "official files": "official `bernini/pipeline.py` `sample_vit_embed`, `scripts/bernini/run_v2v.sh`",
    "other projects": "ComfyUI's `comfy/lora.py`, diffusers `models/transformers/transformer_wan.py`",
    "user paths": "--output outputs/x.mp4 from models/bernini/Bernini-Diffusers or pretrained_models/Bernini-R",
    "patterns": "workflows/*.json, web/docs/<NodeName>.md, tests/test_planner_*.py",
    "urls": "https://github.com/comfyui-bernini/ComfyUI-Bernini/blob/main/docs/nothing.md",
    "existing paths": "bernini_core/planner/maskgit.py, docs/, workflows/api/ and README.md.",
    "a module attribute": "tests/workflow_tools.frontend_widgets",
    "a marked foreign doc": "the official " + "docs/" + "bernini" + ".md",
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_checker_catches_a_bad_citation(case):
    assert problems_in_text(_BAD[case], EXAMPLE), case


@pytest.mark.parametrize("case", sorted(_GOOD))
def test_checker_accepts_a_good_citation(case):
    assert problems_in_text(_GOOD[case], EXAMPLE) == [], case


def test_bare_section_signs_inside_a_doc_refer_to_that_doc():
    doc = "docs/official_behaviour.md"
    assert problems_in_text("as in " + _S + "3.5", doc) == []
    assert problems_in_text("as in " + _S + "42.1", doc)
    assert problems_in_text("as in " + _S + "3.5", "docs/dev/gen_workflows.py")  # not a document


def test_gitignored_paths_are_build_outputs_not_citations():
    patterns = ["__pycache__/", "*.egg-info/", "/.whl/", ".ci/venv/"]
    assert gitignored(".ci/venv", patterns) and gitignored(".ci/venv/bin/python", patterns)
    assert gitignored("bernini_core/__pycache__/x.pyc", patterns) and gitignored(".whl/torch.whl", patterns)
    assert not gitignored(".ci/run", patterns) and not gitignored("tests/" + ".whl/x", patterns)
    assert not gitignored("docs/official_behaviour.md", patterns)


def test_directory_walk_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    files = repository_files()
    assert Path("tests/test_repo_citations.py") in files
    assert not any(part in (".git", "__pycache__") or part.endswith(".egg-info") for f in files for part in f.parts)
    assert Path("LICENSE") not in files
