"""Sequential (block-by-block) calibration: the runner GPTQ, AWQ and SmoothQuant's LLM path calibrate through.

The calibration batches enter the first decoder block as the model computes them; each block is then
handed to the method with its inputs *as produced by the already-compressed blocks before it*, and its
outputs (after compression) become the next block's inputs. Only one block's activations are held at a
time, never the whole model's. Per-block keyword inputs (attention masks, rotary embeddings; Gemma's
differ between sliding and global layers) depend only on the batch shape and its padding mask, so they
are captured from one forward per distinct (shape, mask). Each block runs with its batch's padding mask
known to ``data.drop_padding``: the statistics methods gather in hooks (GPTQ's Hessians, SmoothQuant's
maxima, AWQ's means) see real tokens only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.data import drop_padding, padding_mask, real_token_mask
from bitsmith.method import eval_mode, run_forward
from bitsmith.nn import QuantizedMixin
from bitsmith.progress import log
from bitsmith.quant.layers import float_weights
from bitsmith.topology import DecoderTopology, topology_of


class StopBlock(Exception):
    """Raised by a hook to end a forward pass early (what follows is not needed)."""


@dataclass
class BlockInputs:
    """A block's inputs for every calibration batch: the hidden states and the keyword arguments."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    masks: list[Tensor | None] = field(default_factory=list)  # each batch's real tokens (None: no padding)

    def mask(self, index: int) -> Tensor | None:
        return self.masks[index] if index < len(self.masks) else None

    def __len__(self) -> int:
        return len(self.hidden)


@dataclass
class SequentialStats:
    """What a sequential pass cost: seconds and the process's peak resident memory (bytes)."""

    seconds: float = 0.0
    peak_rss_bytes: int = 0
    blocks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak resident memory in bytes since start or ``reset_peak_rss`` (0 when unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list[Any]) -> list[BlockInputs]:
    """The first block's hidden inputs for every batch, and every block's keyword inputs (one entry per
    block, each with per-batch kwargs and padding masks). Batches of one shape and one padding mask share
    their kwargs."""
    hidden: list[Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]
    masks = [padding_mask(batch) for batch in batches]
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    seen: list[dict[str, Any]] = []

    def keep_kwargs(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            entry = {k: v for k, v in kw.items() if k != "hidden_states"}
            if index == 0:  # only the first block's hidden input is kept; the rest are computed block by block
                entry["hidden_states"] = args[0] if args else kw["hidden_states"]
            seen.append(entry)
            if (stop_at_first and index == 0) or index == len(blocks) - 1:
                raise StopBlock  # nothing after the last block's inputs is needed (the LM head's logits are big)

        return hook

    handles = [block.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, (_, block) in enumerate(blocks)]
    quantized = [m for m in model.modules() if isinstance(m, QuantizedMixin) and m.weight_q is not None]
    try:  # the blocks' outputs here are never used: their weights stay float (quantizers may not be ready yet)
        with eval_mode(model), float_weights(quantized):
            for batch, mask in zip(batches, masks, strict=True):
                key = (tuple(_input_ids(batch).shape), None if mask is None else mask.numpy().tobytes())
                seen.clear()
                stop_at_first = key in by_key  # kwargs known for this shape and mask: stop at the first block
                with contextlib.suppress(StopBlock):
                    run_forward(model, batch)
                hidden.append(seen[0].pop("hidden_states"))
                if not stop_at_first:
                    by_key[key] = list(seen)  # the first entry gave its hidden states to ``hidden`` above
                for index in range(len(blocks)):
                    kwargs[index].append(by_key[key][index])
    finally:
        for handle in handles:
            handle.remove()
    return [BlockInputs(hidden if i == 0 else [], kwargs[i], masks) for i in range(len(blocks))]


def _input_ids(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        return batch["input_ids"]
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    hooks: dict[nn.Module, Callable[..., Any]] | None = None,
    stop_after: nn.Module | None = None,
    batches: int | None = None,
) -> list[Tensor]:
    """Run ``block`` on its inputs (the first ``batches`` of them) with ``hooks`` as forward hooks, each batch
    with its padding mask known to ``drop_padding``; returns the outputs, or nothing when ``stop_after`` ends
    each pass once that module has run."""
    handles = [module.register_forward_hook(hook) for module, hook in (hooks or {}).items()]
    if stop_after is not None:

        def stop(*_: Any) -> None:
            raise StopBlock

        handles.append(stop_after.register_forward_hook(stop))
    outputs = []
    try:
        with eval_mode(block):
            for index, (hidden, kwargs) in list(enumerate(zip(inputs.hidden, inputs.kwargs, strict=True)))[:batches]:
                with contextlib.suppress(StopBlock), real_token_mask(inputs.mask(index)):
                    outputs.append(_first(block(hidden, **kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def module_inputs(block: nn.Module, inputs: BlockInputs, module: nn.Module) -> list[Tensor]:
    """The first positional input of ``module`` inside ``block`` for every batch, padding dropped (each pass
    stops after it)."""
    captured: list[Tensor] = []
    run_block(block, inputs, {module: lambda m, args, out: captured.append(drop_padding(args[0]))}, stop_after=module)
    return captured


def sequential(
    model: nn.Module,
    batches: Iterable[Any],
    compress_block: Callable[[str, nn.Module, BlockInputs, DecoderTopology], None],
    what: str = "calibrating",
) -> SequentialStats:
    """Walk the decoder blocks in order: ``compress_block(name, block, inputs, topology)`` with the inputs
    the compressed blocks before it produce, then the block's own outputs become the next inputs."""
    topology = topology_of(model)
    blocks = topology.blocks(model)
    batches = list(batches)
    reset_peak_rss()
    start = time.perf_counter()
    per_block = capture_inputs(model, blocks, batches)
    hidden = per_block[0].hidden
    for index, (name, block) in enumerate(blocks):
        inputs = BlockInputs(hidden, per_block[index].kwargs, per_block[index].masks)
        compress_block(name, block, inputs, topology)
        hidden = run_block(block, inputs)
        if not all(bool(torch.isfinite(h).all()) for h in hidden):
            raise FloatingPointError(f"{what}: block {name!r} produced non-finite outputs after compression")
        log.info(f"{what}: block {index + 1}/{len(blocks)} done ({time.perf_counter() - start:.0f} s)")
    return SequentialStats(time.perf_counter() - start, peak_rss(), len(blocks))
