"""Every Python example of the README runs on its own, as a reader would paste it into a
fresh interpreter (each in its own process: no names carried over from another example)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_examples() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block; ``>>>`` sessions show output that
    depends on the machine and are not run. (The ```py block in the TRL section is a
    sketch around the reader's own reward function and dataset.)"""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        if not match.group(1).lstrip().startswith(">>>"):
            found.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


def test_the_readme_has_python_examples():
    assert len(python_examples()) >= 4


@pytest.mark.parametrize("line,code", python_examples(),
                         ids=[f"README.md:{line}" for line, _ in python_examples()])
def test_readme_python_example_runs_on_its_own(line, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README.md:{line}:\n{proc.stderr[-3000:]}"
