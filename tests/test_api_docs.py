"""The API reference (``make docs``: MkDocs + mkdocstrings from the docstrings) lists every module and builds
with warnings as errors, so a module added without a page, or a docstring mkdocstrings cannot render, fails here."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "bitsmith"


def test_every_module_has_a_place_in_the_api_reference() -> None:
    listed = {m for page in (ROOT / "docs" / "api").glob("*.md")
              for m in re.findall(r"^::: (\S+)$", page.read_text(), re.M)}  # fmt: skip
    modules = {".".join(("bitsmith", *f.relative_to(SRC).with_suffix("").parts)) for f in SRC.rglob("*.py")
               if f.name not in ("__init__.py", "__main__.py")}  # fmt: skip
    assert not sorted(modules - listed), "add these modules to a page under docs/api/"
    packages = {".".join(("bitsmith", *f.parent.relative_to(SRC).parts)) for f in SRC.rglob("__init__.py")}
    assert not sorted(listed - modules - packages), "docs/api/ names modules that no longer exist"


@pytest.mark.skipif(importlib.util.find_spec("mkdocstrings") is None, reason="extra 'dev' not installed (mkdocs)")
def test_the_api_reference_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "site" / "methods" / "index.html").read_text()
    assert "Hessian error compensation" in page or "GPTQ" in page  # the docstrings are rendered, not just headings
