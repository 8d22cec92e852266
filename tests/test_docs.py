"""Every Python block of the guide pages runs, in order, so the docs cannot rot."""

import pathlib
import re

import pytest


DOCS = pathlib.Path(__file__).parent.parent / "docs"
PAGES = ["testing.md", "nnx.md"]


def python_blocks(page: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python block"
    monkeypatch.chdir(tmp_path)  # nothing a page writes lands in the repository
    namespace: dict = {"__name__": f"docs_{page}"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{page}[block {i}]", "exec")
        exec(code, namespace)
