"""docs/MODELS.md's library example runs as written (on the tiny checkpoint instead of the 7B one)."""

import pathlib
import re

import numpy as np

MODELS_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "MODELS.md"


def test_readme_library_example_runs(tiny_onevision_dir, capsys):
    text = MODELS_DOC.read_text()
    section = text[text.index("Used as a library"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"/models/LLaVA-Video-7B-Qwen2-hf"', repr(str(tiny_onevision_dir)))
    frames = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    scope = {"frames": frames}
    exec(compile(code, "docs/MODELS.md", "exec"), scope)
    result = scope["result"]
    assert result.references == 4 and result.visual_tokens_used < result.visual_tokens_native
    assert capsys.readouterr().out.strip()
