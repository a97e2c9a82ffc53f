"""Files written safely: atomic replacement with normal permissions, and run folders whose outputs are
published together (a manifest written last, checked by readers)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
# Everything `bitsmith run` may write: a rerun removes those it no longer produces (never other files).
RUN_OUTPUTS = ("report.json", "report.md", "layers.png", "training.png", "recipe.resolved.yaml", "model.safetensors",
               "model.gguf")  # fmt: skip
RUN_FOLDERS = ("hf", "compressed-tensors")  # exports that are whole folders


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: 0644 under the usual umask (mkstemp gives 0600)


# How libraries report a write the file system refused (safetensors: "os error 28"; torch.save: "unexpected pos"
# or "file write failed"), besides an OSError with one of FULL_ERRNOS.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FULL_MESSAGES = ("no space left", "os error 28", "os error 27", "file too large", "disk quota", "unexpected pos",
                 "file write failed")  # fmt: skip


class DiskFull(OSError):
    """A file could not be written because its file system (or a file-size limit) refused more bytes."""


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def disk_full(exc: BaseException, path: Path, needed: int | None) -> DiskFull | None:
    """``exc`` as one ``DiskFull`` naming ``path``, the space it needed (``needed`` bytes, when known) and the
    space left there; None when ``exc`` is another failure."""
    full = isinstance(exc, OSError) and exc.errno in FULL_ERRNOS
    if not full and not any(text in str(exc).lower() for text in FULL_MESSAGES):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    sizes = [f"needs about {_mib(needed)}" if needed is not None else None,
             f"{_mib(free)} free there" if free is not None else None]  # fmt: skip
    detail = "; ".join(s for s in sizes if s)
    return DiskFull(errno.ENOSPC, f"no space left for it ({detail})" if detail else "no space left for it", str(path))


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], needed: int | None = None) -> Path:
    """Write ``path`` by calling ``write(temporary path)`` beside it, then renaming it into place: a reader
    sees the old file or the new one, never a part of one. The temporary file is removed on failure; a full
    disk is one ``DiskFull`` error naming the file and the space it ``needed`` (bytes, when the caller knows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except Exception as exc:
        full = disk_full(exc, path, needed)
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(
    path: str | os.PathLike[str], write: Callable[[Path], None], replace: bool = True, needed: int | None = None
) -> Path:
    """Write the folder ``path`` by calling ``write(temporary folder)`` beside it, then renaming it into place:
    it exists whole or not at all. ``replace``: an existing folder is replaced; otherwise one that appeared
    meanwhile (another process wrote it) is kept and this copy dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        write(tmp)
        tmp.chmod(0o777 & ~_umask())
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if replace or not path.is_dir():
                raise
    except Exception as exc:
        full = disk_full(exc, path, needed)
        if full is None:
            raise
        raise full from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def writable_folder(path: Path, what: str = "--out") -> Path:
    """Create ``path`` if needed and check that files can be written there, before any work starts."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot write there ({exc.strerror}); choose a writable folder") from None
    return path


LOCK = ".bitsmith.lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock while a run writes there: a second run into the same folder stops in one line instead
    of both finishing and one losing its results. The lock is the kernel's (``flock``): a killed run frees it."""
    handle = (out / LOCK).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"--out {out}: another run is writing into this folder; wait for it or choose another "
                             "folder") from None  # fmt: skip
        yield
    finally:
        handle.close()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def publish_run(
    out: Path,
    writers: dict[str, Callable[[Path], Any]],
    fingerprint: str | None = None,
    folders: dict[str, Callable[[Path], Any]] | None = None,
) -> list[Path]:
    """Write one run's outputs into ``out`` as a set. ``writers`` maps an output name (one of ``RUN_OUTPUTS``)
    to a function that writes that path atomically, ``folders`` an export folder (one of ``RUN_FOLDERS``) to
    one that writes it whole. The old manifest goes first (from then on readers see an unfinished folder),
    outputs and export folders of an earlier run that this one does not produce and left-over temporary files
    are removed, and the manifest with every file's SHA-256 and the run's ``fingerprint`` (what made it: the
    resolved recipe and settings) is written last. A failing writer leaves the folder unfinished."""
    folders = folders or {}
    unknown = (set(writers) - set(RUN_OUTPUTS)) | (set(folders) - set(RUN_FOLDERS))
    if unknown:
        raise ValueError(f"not run outputs: {sorted(unknown)}")
    manifest = out / MANIFEST
    manifest.unlink(missing_ok=True)
    for name, write in writers.items():
        write(out / name)
    for name in set(RUN_OUTPUTS) - set(writers):
        (out / name).unlink(missing_ok=True)
    for name in set(RUN_FOLDERS) - set(folders):
        shutil.rmtree(out / name, ignore_errors=True)
    for name, write in folders.items():
        write(out / name)
    for leftover in out.glob(f".*{TMP_SUFFIX}"):
        (shutil.rmtree if leftover.is_dir() else Path.unlink)(leftover)
    record = {"files": {name: sha256_file(out / name) for name in writers},
              "folders": {name: folder_digests(out / name) for name in folders}, "fingerprint": fingerprint}  # fmt: skip
    atomic_write_text(manifest, json.dumps(record, indent=2))
    return [out / name for name in [*writers, *folders]]


def run_fingerprint_of(folder: Path) -> str | None:
    """The fingerprint a finished run's manifest records (None: none, or no manifest)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


class IncompleteRun(ValueError):
    """A run folder whose outputs were not all written by one finished run."""


def check_run(folder: Path) -> dict[str, Any]:
    """The report of a finished run folder, after checking every output against the manifest."""
    folder = Path(folder)
    if not (folder / "report.json").is_file() and not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder}: not a run folder (no report.json); run `bitsmith run` first")
    if not (folder / MANIFEST).is_file():
        raise IncompleteRun(
            f"{folder}: the run did not finish writing its outputs (no {MANIFEST}); run it again into this folder"
        )
    try:
        record = json.loads((folder / MANIFEST).read_text())
        files, exported = record["files"], record.get("folders") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        files = exported = None
    if not isinstance(files, dict) or not isinstance(exported, dict):
        raise IncompleteRun(f"{folder / MANIFEST}: unreadable; run it again into this folder")
    for name in files:
        path = folder / name
        if name not in RUN_OUTPUTS or not path.is_file() or sha256_file(path) != files[name]:
            raise IncompleteRun(
                f"{folder}: {name} is missing or differs from the one the run wrote; run it again into this folder"
            )
    for name, digests in exported.items():
        if name not in RUN_FOLDERS or not isinstance(digests, dict) or folder_digests(folder / name) != digests:
            raise IncompleteRun(
                f"{folder}: the export {name}/ is missing or differs from the one the run wrote; run it again"
            )
    return json.loads((folder / "report.json").read_text())
