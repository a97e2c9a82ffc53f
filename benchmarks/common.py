"""Shared benchmark helpers: the zoo models with their evaluation tasks, and resumable result rows."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from bitsmith.eval.latency import load_averages
from bitsmith.eval.tasks import Task, classification_task, embedding_task
from bitsmith.files import atomic_write_text
from bitsmith.zoo import pretrained

RESULTS = Path(__file__).parent.parent / "docs" / "results"


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every resumable benchmark takes: ``--write-only`` (rewrite the page) and ``--only TEXT``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--write-only", action="store_true", help="rewrite the page from the stored rows")
    parser.add_argument("--only", default=None, help="measure only the rows whose label contains this")
    return parser


def save_figure(fig: Any, name: str) -> None:
    """Lay out ``fig``, write it to ``docs/results/NAME`` (atomically) and free it."""
    from bitsmith.eval.report import save_figure as save

    fig.tight_layout()
    save(fig, RESULTS / name)


def load(name: str, calib_size: int | None = None) -> tuple[nn.Module, Task]:
    """A zoo model (``cnn``, ``vit``) on Fashion-MNIST or ``minilm`` on the docstring pairs, in eval mode."""
    if name == "minilm":
        from bitsmith.zoo.minilm import load_hf_encoder

        model, tokenizer = load_hf_encoder()
        return model, embedding_task(tokenizer, None, calib_size or 128, 32, seed=0)
    return pretrained(name), classification_task(None, None, calib_size or 512, 128, seed=0)


class Rows:
    """Result rows saved to a JSON file after each one: an interrupted benchmark resumes where it
    stopped, and rows already there are not re-measured (delete the file to measure everything again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
        self.extra: dict[str, Any] = {}  # fields every new row gets (e.g. the FP32 accuracy it started from)

    def done(self, **key: Any) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        """Append ``row`` to the file as it is now (another benchmark process may have added rows)."""
        on_disk = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.rows = [*on_disk, {**row, **self.extra, "load": load_averages()}]  # timed rows run alone: load shows it
        atomic_write_text(self.path, json.dumps(self.rows, indent=1))

    def put(self, row: dict[str, Any], **key: Any) -> None:
        """Like ``add``, replacing the rows that match ``key`` (a re-measurement; it keeps the first one's place)."""
        on_disk = json.loads(self.path.read_text()) if self.path.is_file() else []
        match = [all(r.get(k) == v for k, v in key.items()) for r in on_disk]
        at = match.index(True) if any(match) else len(on_disk)
        kept = [r for r, m in zip(on_disk, match, strict=True) if not m]
        self.rows = [*kept[:at], row, *kept[at:]]
        atomic_write_text(self.path, json.dumps(self.rows, indent=1))


def train_cached(model: nn.Module, methods: list[dict[str, Any]], cfg: Any, x: Any, y: Any, final: Path,
                 finalize: bool = True) -> tuple[nn.Module, float]:  # fmt: skip
    """``model`` compressed with ``methods`` (recipe entries; calibrated on the first 256 images) and trained on
    ``x, y``, saved at ``final`` with its training seconds beside it; a file already there is loaded instead (other
    rows reuse it), and a killed run resumes from its last epoch (``final`` with ``.pt``)."""
    from bitsmith import build_method, compress, load, save
    from bitsmith.train import fit

    if final.is_file():  # load rebuilds the compressed layers the file records
        return load(final, model).eval(), json.loads(final.with_suffix(".json").read_text())["seconds"]
    final.parent.mkdir(parents=True, exist_ok=True)
    state = final.with_suffix(".pt")
    began = time.perf_counter()
    built = [build_method(m) for m in methods]
    compress(model, built, [(x[:256], y[:256])])
    fit(model, x, y, cfg, built, checkpoint=state)
    if finalize:
        for method in built:
            method.finalize(model)
    seconds = time.perf_counter() - began
    save(model, final)
    final.with_suffix(".json").write_text(json.dumps({"seconds": round(seconds, 1)}))
    state.unlink(missing_ok=True)
    return model.eval(), seconds


@contextlib.contextmanager
def peer_run(python: Path, script: str, model_dir: Path, task: Any, *args: str) -> Iterator[tuple[Path, dict]]:
    """Run a peer toolkit's ``script`` in its own venv (``python``) as ``script MODEL_DIR CALIB OUT *args``, on the
    task's calibration windows (saved as a safetensors file); yields the output folder and its ``timing.json``
    while the temporary folder lives. A missing venv or a failed run is one line naming the peer."""
    import torch
    from safetensors.torch import save_file

    peer = Path(script).stem
    if not python.exists():
        raise RuntimeError(
            f"{peer}: its venv {python.parent.parent} is missing: run `make {python.parent.parent}/.installed`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ids = torch.cat([batch["input_ids"] for batch in task.calibration])
        save_file({"input_ids": ids.contiguous()}, f"{tmp}/calib.safetensors")
        command = [str(python), script, str(model_dir), f"{tmp}/calib.safetensors", f"{tmp}/out", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{peer} failed: {done.stderr.strip().splitlines()[-1][:200]}")
        yield Path(tmp) / "out", json.loads((Path(tmp) / "out" / "timing.json").read_text())


def table_rows(rows: list[dict[str, Any]], cells: Callable[[dict[str, Any]], list[str]], width: int) -> list[str]:
    """Markdown table rows: ``cells(r)`` for a measured row; for a failed one its ``variant`` and its error, padded
    to ``width`` columns."""
    out = []
    for r in rows:
        values = [r["variant"], f"error: {r['error']}", *[""] * (width - 2)] if "error" in r else cells(r)
        out.append("| " + " | ".join(values) + " |")
    return out
