"""Real English prose from Debian packages, unpacked (not installed) into bitsmith's data cache:

* Jane Austen's six novels from ``r-cran-janeaustenr`` (public domain), read from the R lazy-load data
  files (``Rdata.rdx`` index + ``Rdata.rdb`` records) with PyPI ``rdata``, without R;
* the Python documentation sources (``.rst.txt``) from ``python3.11-doc``, prose only (code blocks,
  directives and tables are dropped).

``python -m bitsmith.zoo.prose`` (run by ``make data``) fetches both with ``apt-get download`` and
``dpkg-deb -x``; ``BITSMITH_TEXT`` names a folder that already holds the unpacked packages.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

PACKAGES = ("r-cran-janeaustenr", "python3.11-doc")
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
MAX_RECORD_BYTES = 16 << 20  # one novel is about 1 MB serialised; a larger record is not one


def text_root() -> Path:
    from bitsmith.zoo import cache_dir

    return Path(os.environ.get("BITSMITH_TEXT", cache_dir() / "data"))


def package_dir(package: str, fetch: bool = False) -> Path:
    """The unpacked Debian ``package`` (fetched with apt-get download + dpkg-deb -x when ``fetch``)."""
    out = text_root() / package
    if out.is_dir():
        return out
    if not fetch:
        raise FileNotFoundError(f"{out}: Debian package {package} is not unpacked; run `make data` "
                                "(or `python -m bitsmith.zoo.prose`)")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if done.returncode or not debs:
            reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise RuntimeError(f"apt-get download {package} failed ({reason}); run `apt-get update` first")
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        unpacked.rename(out)
    return out


def _record(blob: bytes, offset: int, length: int, what: str) -> bytes:
    """One lazy-load record: a 4-byte big-endian size, then the zlib-compressed serialisation (bounded)."""
    if offset < 0 or length < 5 or offset + length > len(blob):
        raise ValueError(f"{what}: record at {offset}+{length} lies outside the {len(blob)}-byte file")
    size = int.from_bytes(blob[offset : offset + 4], "big")
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"{what}: record declares {size} bytes (more than {MAX_RECORD_BYTES}); corrupt file")
    inflater = zlib.decompressobj()
    raw = inflater.decompress(blob[offset + 4 : offset + length], size + 1)
    if len(raw) != size:
        raise ValueError(f"{what}: record inflates to {len(raw)} bytes, declared {size}; corrupt file")
    return raw


def austen_novels() -> dict[str, str]:
    """The six novels as text (``{name: text}``), lines joined with newlines (parsed once per process)."""
    return dict(_parsed_novels())


@functools.cache
def _parsed_novels() -> tuple[tuple[str, str], ...]:
    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")  # the .rdx/.rdb records are RDS
    data = package_dir("r-cran-janeaustenr") / AUSTEN_DATA
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        raw = _record(blob, int(offset), int(length), f"{data / 'Rdata.rdb'} ({name})")
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))
        novels[str(name)] = "\n".join(str(line) for line in lines)
    missing = set(NOVELS) - set(novels)
    if missing:
        raise ValueError(f"{data}: novels {sorted(missing)} are missing from the package data")
    return tuple(novels.items())


_DIRECTIVE = re.compile(r"^\s*(\.\. |:[\w-]+:|\+[-=+]+|\|)")


def rst_prose(source: str) -> str:
    """The prose paragraphs of a reStructuredText source: no literal blocks (``::`` and the indented block
    after it), directives and their bodies, doctest lines, tables or section underlines."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # inside a literal block or directive body: skip lines indented deeper
    for line in source.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if not stripped or re.fullmatch(r"([=\-~^*#\"'`+.])\1{2,}", stripped):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if _DIRECTIVE.match(line) or stripped.startswith(">>>"):
            skip_indent = indent
            continue
        if stripped.endswith("::"):
            stripped = stripped[:-2].rstrip()
            skip_indent = indent
        if stripped:
            current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 5)


@functools.cache
def python_docs(part: str = "library") -> str:
    """The prose of the Python 3.11 documentation sources under ``part`` (a folder of the docs: ``library`` is
    the module reference), files in sorted path order."""
    root = package_dir("python3.11-doc") / PYDOC_SOURCES / part
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"{root}: no .rst.txt files; the python3.11-doc package is incomplete")
    return "\n\n".join(rst_prose(path.read_text(encoding="utf-8", errors="replace")) for path in files)


def fetch_all() -> list[Path]:
    """Unpack every text package into the data cache (``make data``)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not available; set BITSMITH_TEXT to a folder with the unpacked packages")
    return [package_dir(package, fetch=True) for package in PACKAGES]


if __name__ == "__main__":
    for path in fetch_all():
        print(path)
