"""Generic in-memory data helpers: fixed-seed subsets and mini-batches."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def subset(images: Tensor, labels: Tensor, size: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed-seed random subset of ``size`` examples (all of them when ``size`` is None)."""
    if size is None or size >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return images[idx], labels[idx]


def batches(
    images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches from in-memory tensors (faster than a DataLoader for data this small)."""
    n = images.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


def first_example(batch: Any) -> Any:
    """The first example of a batch, still batched: a tensor, an (inputs, labels) pair or a dict of tensors."""
    if isinstance(batch, dict):
        return {key: value[:1] for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(part[:1] for part in batch)
    return batch[:1]


def concat_batches(items: list[Any]) -> Any:
    """One batch from several: tensors are concatenated on dim 0 (right-padded with zeros on dim 1 when
    sequence lengths differ, as for tokenized text), dicts key by key, tuples item by item."""
    first = items[0]
    if isinstance(first, Tensor):
        if first.dim() >= 2 and len({t.shape[1] for t in items}) > 1:
            length = max(t.shape[1] for t in items)
            items = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in items]
        return torch.cat(items)
    if isinstance(first, dict):
        return {key: concat_batches([item[key] for item in items]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches(list(parts)) for parts in zip(*items, strict=True))
    raise TypeError(f"cannot concatenate calibration batches of type {type(first).__name__}")


def _float_tensors(batch: Any) -> list[tuple[str, Tensor]]:
    """The floating-point tensors of a batch (a tensor, a tuple/list or a dict of them), with their names."""
    if isinstance(batch, Tensor):
        return [("inputs", batch)] if batch.is_floating_point() else []
    items = batch.items() if isinstance(batch, dict) else enumerate(batch if isinstance(batch, (tuple, list)) else [])
    return [(str(key), value) for key, value in items if isinstance(value, Tensor) and value.is_floating_point()]


def check_finite(batches: list[Any], what: str = "calibration") -> None:
    """Refuse NaN or inf in ``batches`` with one line naming the batch, the tensor and the first bad element;
    warn when every floating-point input is constant (its statistics would be degenerate)."""
    constant, seen = True, False
    for index, batch in enumerate(batches):
        for name, tensor in _float_tensors(batch):
            seen = True
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                position = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"{what} batch {index}, {name}: {int(bad.sum())} non-finite value(s), the first "
                    f"{float(tensor[position])} at {position}; clean the data (NaN/inf would poison every statistic)"
                )
            constant = constant and (tensor.numel() < 2 or bool((tensor == tensor.flatten()[0]).all()))
    if constant and seen:
        warnings.warn(f"every {what} input is constant: ranges and statistics will be degenerate", stacklevel=3)


_REAL_TOKENS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("real_tokens", default=None)


def token_windows(batches: list[Any]) -> list[Tensor]:
    """Every row of token batches (dicts with ``input_ids``, or ``(ids, ...)`` tuples) as a ``(1, length)`` tensor."""
    ids = [b["input_ids"] if isinstance(b, dict) else b[0] for b in batches]
    return [row[None] for batch in ids for row in batch]


def padding_mask(batch: Any) -> Tensor | None:
    """The real-token mask ``(batch, tokens)`` of a text batch (a dict with ``attention_mask``), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.bool()


@contextlib.contextmanager
def real_tokens(batch: Any) -> Iterator[None]:
    """While a padded text batch (a dict with ``attention_mask``) runs through the model inside this block,
    ``drop_padding`` removes its padding positions from the activations that statistics are taken on."""
    with real_token_mask(padding_mask(batch)):
        yield


@contextlib.contextmanager
def real_token_mask(mask: Tensor | None) -> Iterator[None]:
    """``real_tokens`` for a part of the model run on its own (a decoder block) with the batch's mask."""
    token = _REAL_TOKENS.set(mask)
    try:
        yield
    finally:
        _REAL_TOKENS.reset(token)


def current_mask() -> Tensor | None:
    """The real-token mask ``drop_padding`` applies now (None outside ``real_tokens``)."""
    return _REAL_TOKENS.get()


def drop_padding(x: Tensor) -> Tensor:
    """``x`` of shape ``(batch, tokens, ...)`` as ``(real tokens, ...)`` inside ``real_tokens``; any other
    tensor (images, or outside the block) unchanged."""
    mask = _REAL_TOKENS.get()
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask]
