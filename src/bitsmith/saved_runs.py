"""A run saved by ``bitsmith run``, scored again (``bitsmith eval``): what a task kind's ``reload`` is given, and the
shared step of loading the checkpoint into a float model that is first checked to be float and scored as the
reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class SavedRun:
    """A checkpoint written by ``bitsmith run`` to be scored again (``bitsmith eval``): its path and metadata, the
    model name (the checkpoint's, or ``--model``), and how many text windows of how many tokens an LLM is scored on."""

    path: str
    meta: dict[str, Any]
    name: str
    given: bool  # the name came from --model, not from the file
    data_root: str | None = None
    windows: int | None = None
    window: int = 512
    data: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.meta.get("recipe", {}).get("data", {})

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 0))

    def refuse_named_directory(self, known: Any) -> None:
        """bitsmith never opens a path a checkpoint names: a directory model needs ``--model DIR``."""
        if not self.given and self.name not in known:
            raise ValueError(f"{self.path}: the checkpoint was made from the model directory "
                             f"{str(self.meta.get('source'))[:200]!r}; pass --model DIR to load it (bitsmith does not "
                             "open paths named inside a checkpoint)")  # fmt: skip


def refuse_quantized_reference(model: nn.Module, name: str) -> None:
    """The reference of KL, agreement and cosine must be a float model: an already-quantized directory (a
    bitsmith HF export) would score a quantized checkpoint against itself (KL 0)."""
    from bitsmith.nn import QuantizedMixin

    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedMixin) and m.weight_q is not None]
    if quantized:
        raise ValueError(
            f"--model {str(name)[:200]} is itself quantized ({len(quantized)} quantized layers, e.g. {quantized[0]!r}): "
            "KL, agreement and cosine need the float model the checkpoint was made from; pass that directory"
        )


def score_against_float(saved: SavedRun, fp32: nn.Module, task: Any) -> tuple[nn.Module, nn.Module, Any]:
    """Load ``saved`` into a copy of the float model (refused when the float model is itself quantized: KL and
    cosine need a float reference) and score the float model first, as the reference."""
    from bitsmith.export.checkpoint import load
    from bitsmith.progress import log

    refuse_quantized_reference(fp32, saved.name)
    model = load(saved.path, copy.deepcopy(fp32)).eval()  # a checkpoint that does not fit stops here
    log.info(f"scoring the float {saved.name} (the reference) on {task.eval_examples} examples")
    task.evaluate(fp32)
    return model, fp32, task
