"""Every Python example in the README and the method pages runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "methods").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {"__name__": "__doc_example__"})


def test_the_readme_lists_every_registered_method_with_its_page() -> None:
    from bitsmith.method import METHODS, methods_markdown

    readme = (ROOT / "README.md").read_text()
    listed = readme.split("<!-- methods -->\n")[1].split("\n<!-- /methods -->")[0]
    assert listed == methods_markdown(), "README's methods table is stale: paste `bitsmith methods --markdown`"
    for name, cls in METHODS.items():
        assert (ROOT / "docs" / "methods" / f"{cls.doc_page or name}.md").is_file(), f"{name} has no page"
