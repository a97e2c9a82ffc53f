"""A small training loop with method hooks (``perturb``, ``penalty``) and a plain evaluation loop."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith import distributed
from bitsmith.data import batches, check_finite
from bitsmith.files import atomic_write
from bitsmith.method import Method, eval_mode, first_nonfinite_layer
from bitsmith.progress import duration, log, track
from bitsmith.structure import is_vit, shrink_to, structure_counts


@dataclass
class TrainConfig:
    """Optimisation settings (one recipe ``train`` section)."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum 0.9, nesterov) or adamw
    lr: float = 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rules = {
            "epochs": (self.epochs >= 0, ">= 0"), "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr >= 0, ">= 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "warmup_epochs": (self.warmup_epochs >= 0, ">= 0"),
        }  # fmt: skip
        for name, (ok, allowed) in rules.items():
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """What an epoch callback sees: the epoch just finished (1-based), the global step, the history."""

    epoch: int
    step: int
    history: list[dict[str, Any]]


EpochCallback = Callable[[nn.Module, TrainState], None]


PLAIN = (Tensor, int, float, bool, str, type(None))


def plain_state(method: Method) -> dict[str, Any]:
    """``method.state_dict()``, checked to hold only what ``torch.load(weights_only=True)`` reads back."""
    state = method.state_dict()

    def check(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                check(key, where)
                check(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                check(item, f"{where}[{index}]")
        elif not isinstance(value, PLAIN):
            raise TypeError(
                f"method {method.registered_name!r}: state {where} is a {type(value).__name__}; a training "
                "checkpoint holds tensors and plain data only (override Method.state_dict)"
            )

    for name, value in state.items():
        check(value, name)
    return state


def materialize_buffers(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give every ``None`` buffer that ``state`` holds (a mask made during training) a tensor of the saved
    shape, so ``load_state_dict`` can fill it."""
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            key = f"{prefix}.{name}" if prefix else name
            if buffer is None and key in state:
                module._buffers[name] = torch.empty_like(state[key])


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    methods: list[Method],
    fingerprint: str | None = None,
) -> None:
    """Atomically write model, optimizer, methods' run-time state, progress and RNG state (a kill mid-write
    keeps the old file)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "rng": torch.get_rng_state(),
        "methods": [plain_state(method) for method in methods],
        "fingerprint": fingerprint,
    }
    if is_vit(model):  # structured pruning may have narrowed it: the widths rebuild the shapes on resume
        payload["structure"] = structure_counts(model)
    tensors = [t for t in [*payload["model"].values(), *_tensors(payload["optimizer"])] if isinstance(t, Tensor)]
    atomic_write(path, lambda tmp: torch.save(payload, tmp), sum(t.numel() * t.element_size() for t in tensors))


def _tensors(tree: Any) -> list[Any]:
    """The leaves of nested dicts and lists (an optimizer's state)."""
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _tensors(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _tensors(value)]
    return [tree]


def rank_state_path(path: Path, rank: int, epoch: int) -> Path:
    """Where process ``rank`` > 0 of a multi-process run keeps its own state after ``epoch`` (its batch-norm
    statistics, observed ranges and RNG are its own); rank 0's is ``path``."""
    return path.with_name(f"{path.stem}.rank{rank}.epoch{epoch}{path.suffix}")


def save_states(
    path: Path, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, *rest: Any
) -> None:
    """Every process saves its state; rank 0's file, written last, is the one a resume starts from, and each
    other rank keeps its file of that epoch (older ones are removed once rank 0's is written)."""
    if rank > 0:
        save_training_state(rank_state_path(path, rank, state.epoch), model, optimizer, state, *rest)
    distributed.barrier()
    if rank == 0:
        save_training_state(path, model, optimizer, state, *rest)
    distributed.barrier()
    if rank > 0:
        for old in path.parent.glob(f"{path.stem}.rank{rank}.epoch*{path.suffix}"):
            if old != rank_state_path(path, rank, state.epoch):
                old.unlink(missing_ok=True)


def state_of_rank(path: Path, rank: int) -> Path:
    """The state process ``rank`` resumes from: its own of rank 0's epoch, else (killed between the two
    writes) rank 0's, with a warning that the run is no longer bit-identical to an uninterrupted one."""
    if rank == 0:
        return path
    try:
        epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001  (load_training_state names the problem)
        return path
    own = rank_state_path(path, rank, epoch)
    if own.is_file():
        return own
    log.warning(f"rank {rank}: no state of its own for epoch {epoch} ({own.name}); resuming from rank 0's: its "
                "batch-norm statistics and observed ranges replace this process's, so the run is no longer "
                "bit-identical to an uninterrupted one")  # fmt: skip
    return path


def remove_training_states(path: Path) -> None:
    """Delete a run's training state: rank 0's file and every other rank's."""
    path.unlink(missing_ok=True)
    for other in path.parent.glob(f"{path.stem}.rank*{path.suffix}"):
        other.unlink(missing_ok=True)


class StaleTrainingState(ValueError):
    """A training state written by another run (a different recipe, model or data)."""


def load_training_state(
    path: Path, model: nn.Module, cfg: TrainConfig, methods: list[Method] | None = None, fingerprint: str | None = None
) -> tuple[TrainState, torch.optim.Optimizer]:
    """Restore what ``save_training_state`` wrote (tensors and plain data only: ``weights_only=True``);
    each method's state is restored and its ``resume`` hook runs first (they may rebuild modules a schedule replaced), and the
    optimizer is built after the model's state is loaded, so it holds resized parameters too."""
    methods = methods or []
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("fingerprint") != fingerprint:
            raise StaleTrainingState(
                f"{path}: this training state was started by a different recipe, model or data; resuming it "
                "would mix two runs. Start over with --restart (or delete the file), or use another --out"
            )
        if len(payload["methods"]) != len(methods):
            raise ValueError(f"it was written for {len(payload['methods'])} method(s), this run has {len(methods)}")
        if "structure" in payload:
            shrink_to(model, payload["structure"])
        for method, method_state in zip(methods, payload["methods"], strict=True):
            method.load_state_dict(method_state)
            method.resume(model, payload["epoch"], cfg.epochs)
        materialize_buffers(model, payload["model"])
        model.load_state_dict(payload["model"])
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict(payload["optimizer"])
    except StaleTrainingState:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and how to recover
        first_line = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{path}: cannot resume training from this file (corrupt, or not a bitsmith training state: "
            f"{first_line}); delete it to start from scratch"
        ) from None
    torch.set_rng_state(payload["rng"])
    return TrainState(payload["epoch"], payload["step"], payload["history"]), optimizer


def fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    methods: list[Method] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    callbacks: list[EpochCallback] | None = None,
    fingerprint: str | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on in-memory data; methods' ``perturb``, ``penalty`` and ``after_backward`` hooks
    join every step, their ``schedule`` hook every epoch. The task loss is cross-entropy on class ``labels``, or
    ``loss_fn(output, target)`` (e.g. MSE to a clean image for restoration; no training top-1 is counted then).

    With ``checkpoint``, the training state is written there atomically after every epoch, and a run
    that finds the file resumes after its last finished epoch and ends where an uninterrupted run
    ends (the shuffling is seeded per epoch; the RNG state is saved). ``fingerprint`` (e.g. a digest of
    the recipe and model) is stored with the state, and a state with another fingerprint is refused.
    ``callbacks`` run after each epoch (before the checkpoint), e.g. for schedules.

    Under ``torchrun`` (``bitsmith.distributed``) every process trains on its slice of each batch, the gradients
    are summed over processes before the methods' ``after_backward`` hooks, and rank 0 alone writes the state.
    """
    methods = methods or []
    check_finite([images], "training data")
    at = distributed.world()
    distributed.check_batch_size(cfg.batch_size, at.size)
    torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(images.shape[0] / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    state = TrainState(0, 0, [])
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        state, optimizer = load_training_state(state_of_rank(path, at.rank), model, cfg, methods, fingerprint)
    else:
        optimizer = make_optimizer(model, cfg)
        if at.size > 1:
            distributed.broadcast_state(model)
    model.train()
    started, first_epoch = time.perf_counter(), state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_batches = batches(images, labels, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)
        for batch in track(epoch_batches, f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, total, warmup, cfg.lr)
            batch, weight = distributed.shard(batch, at)
            for method in methods:
                batch = method.perturb(model, batch)
            x, y = batch
            logits, loss = None, None
            for method in methods:  # the first objective replaces the task loss; later ones are not computed
                loss = method.objective(model, batch)
                if loss is not None:
                    break
            if loss is None:
                logits = model(x)
                loss = (loss_fn(logits, y) if loss_fn is not None else
                        nn.functional.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))  # fmt: skip
            for method in methods:
                loss = loss + method.penalty(model, batch)
            if not torch.isfinite(loss):
                layer = first_nonfinite_layer(model, x)
                where = f"the first non-finite output is at layer {layer}" if layer else "the outputs are finite"
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {state.step} ({where}); "
                    "lower the lr or check the method's settings"
                )
            optimizer.zero_grad(set_to_none=True)
            (loss * weight if at.size > 1 else loss).backward()
            if at.size > 1:
                distributed.sum_gradients(model)
            if any([method.after_backward(model) for method in methods]):  # e.g. units removed
                optimizer = make_optimizer(model, cfg)
            else:
                optimizer.step()
                for method in methods:
                    method.after_step(model)
            state.step += 1
            loss_sum += loss.item() * y.shape[0]
            if loss_fn is None:  # a classifier: training top-1
                if logits is None:  # an objective replaced the task loss: the model's own output, in eval mode
                    with torch.no_grad(), eval_mode(model):  # (batch norm statistics not updated again)
                        logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
        loss_sum, correct, seen = distributed.sum_counts([loss_sum, correct, seen])
        if at.size > 1:
            distributed.check_in_step(model)
        state.epoch = epoch + 1
        top1 = {"train_accuracy": correct / seen} if loss_fn is None else {}
        state.history.append({"epoch": epoch + 1, "loss": loss_sum / seen, **top1})
        elapsed = time.perf_counter() - started
        left = elapsed / (epoch + 1 - first_epoch) * (cfg.epochs - epoch - 1)
        shown = f", train top-1 {100 * correct / seen:.2f}%" if loss_fn is None else ""
        log.info(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f}{shown}, "
                 f"{duration(elapsed)} elapsed, about {duration(left)} left")  # fmt: skip
        replaced = [method.schedule(model, state.epoch, cfg.epochs) for method in methods]
        if any(replaced):  # parameters changed shape or identity: a fresh optimizer sees the new ones
            optimizer = make_optimizer(model, cfg)
        for callback in callbacks or []:
            callback(model, state)
        if path is not None:
            save_states(path, at.rank, model, optimizer, state, methods, fingerprint)
        distributed.barrier()
    model.eval()
    return state.history


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Top-1 class of every image."""
    n_batches = math.ceil(images.shape[0] / batch_size)
    with eval_mode(model):
        return torch.cat([model(x).argmax(1) for x in track(images.split(batch_size), "evaluating", n_batches)])


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, images, batch_size) == labels).float().mean())
