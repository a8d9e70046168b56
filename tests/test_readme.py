"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert python_blocks(), "README lost its Python example"


def test_readme_examples_run(tmp_path: pathlib.Path, monkeypatch: object) -> None:
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), {})
