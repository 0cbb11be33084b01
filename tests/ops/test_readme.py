"""The README and docs/ hold up: every Python example runs on its own, as a reader would
paste it into a fresh interpreter (each in its own process: no names carried over from
another example), every relative link resolves inside the repository, and the README stays
short enough to be read first."""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# The training package's runtime dependencies (pyproject.toml), by import name: CI's stage
# against the CUDA build installs only the ops' test dependencies.
TRAINING_DEPENDENCIES = ("transformers", "peft", "safetensors", "math_verify", "yaml", "tqdm",
                         "tensorboard", "matplotlib")
# The adapters' own frameworks, by the module an example imports.
ADAPTER_DEPENDENCIES = {"lambdapo.integrations.trl": ("trl",),
                        "lambdapo.integrations.verl": ("verl",)}


def python_examples() -> list[tuple[str, int, str]]:
    """(page, line number, code) of each ```python block; ``>>>`` sessions show output that
    depends on the machine and are not run. (The ```py block of the TRL page is a sketch
    around the reader's own reward function and dataset.)"""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            if not match.group(1).lstrip().startswith(">>>"):
                # A block inside a list item is indented with it.
                found.append((page.relative_to(ROOT).as_posix(),
                              text.count("\n", 0, match.start()) + 1,
                              textwrap.dedent(match.group(1))))
    return found


def relative_links() -> list[tuple[Path, str]]:
    links = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if not re.match(r"[a-z]+://|mailto:", target):
                links.append((page, target))
    return links


def test_the_readme_has_python_examples():
    assert sum(page == "README.md" for page, _, _ in python_examples()) >= 4


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_links_resolve_inside_the_repository():
    broken = []
    for page, target in relative_links():
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{page.name}: {target}")
        elif anchor and resolved.suffix == ".md":
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", resolved.read_text(), flags=re.M)}
            if anchor not in headings:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("page,line,code", python_examples(),
                         ids=[f"{page}:{line}" for page, line, _ in python_examples()])
def test_python_example_runs_on_its_own(page, line, code, tmp_path):
    imported = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, flags=re.M))
    needed = {name.split(".")[0] for name in imported} - {"lambdapo", "lambdapo_ext"}
    if any(name == "lambdapo" or name.startswith("lambdapo.") for name in imported):
        needed |= set(TRAINING_DEPENDENCIES)
    for module, frameworks in ADAPTER_DEPENDENCIES.items():
        if module in imported:
            needed |= set(frameworks)
    missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {missing}, which are not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page}:{line}:\n{proc.stderr[-3000:]}"
