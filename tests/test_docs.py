"""Every Python example in the README and the method pages runs; their prose quotes only numbers that are in
a results table."""

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


def _prose(text: str) -> str:
    """A page without code blocks, inline code (settings are written as code) and table rows."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(re.sub(r"`[^`]*`", "", line) for line in text.splitlines() if not line.startswith("|"))


def test_pages_quote_only_numbers_that_are_in_a_results_table() -> None:
    """A decimal number in the prose of a method page, deploy.md or the README must appear in some table of
    docs/results/ (a setting is written as code, e.g. `alpha 0.85`)."""
    results = "\n".join(p.read_text() for p in (ROOT / "docs" / "results").glob("*.md"))
    known = set(re.findall(r"\d+\.\d+", results))
    pages = [*sorted((ROOT / "docs" / "methods").glob("*.md")), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    missing = [
        f"{page.relative_to(ROOT)}: {number}"
        for page in pages
        for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", _prose(page.read_text()))
        if number not in known
    ]
    assert not missing, "numbers in no results table: " + ", ".join(missing)
