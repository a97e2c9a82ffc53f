"""Real English text that ships with every machine: the docstrings of Python's standard library.

Pairs for retrieval are (summary line, rest of the docstring) of public functions and classes in a
fixed list of modules, so the corpus is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch", "fractions",
    "ftplib", "functools", "gzip", "hashlib", "heapq", "html", "http.client", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "mimetypes", "operator",
    "os", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "sched", "secrets",
    "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zlib",
)  # fmt: skip


def _clean(text: str) -> str:
    return " ".join(text.split())


def docstring_pairs(limit: int | None = None, min_chars: int = 60) -> list[tuple[str, str]]:
    """(query, passage) pairs: a docstring's first line and the text after it, deduplicated."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            head, _, body = doc.partition("\n")
            head, body = _clean(head), _clean(body)
            if len(head) < 20 or len(body) < min_chars or head in seen:
                continue
            seen.add(head)
            pairs.append((head, body[:600]))
    return pairs[:limit] if limit else pairs


def sentences(limit: int | None = None) -> list[str]:
    """Calibration / evaluation sentences: both sides of every pair, interleaved."""
    out = [text for pair in docstring_pairs() for text in pair]
    return out[:limit] if limit else out
