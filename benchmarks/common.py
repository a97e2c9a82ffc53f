"""Shared benchmark helpers: the zoo models with their evaluation tasks, and resumable result rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from bitsmith.eval.latency import load_averages
from bitsmith.eval.tasks import Task, classification_task, embedding_task
from bitsmith.files import atomic_write_text
from bitsmith.zoo import pretrained

RESULTS = Path(__file__).parent.parent / "docs" / "results"


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
        """Like ``add``, replacing the rows that match ``key`` (a re-measurement)."""
        on_disk = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.rows = [r for r in on_disk if not all(r.get(k) == v for k, v in key.items())] + [row]
        atomic_write_text(self.path, json.dumps(self.rows, indent=1))
