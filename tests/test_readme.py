"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks use names from earlier ones
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "['lora_A', 'lora_B']" in out and "True" in out
    assert namespace["merged"].bits == 3
