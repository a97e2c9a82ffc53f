"""The Method base dataclass (hooks ``prepare``, ``calibrate``, ``perturb``, ``objective``, ``penalty``,
``after_backward``, ``after_step``, ``schedule``, ``resume``, ``finalize``; ``state_dict`` for resumable runs),
its registry, and ``compress()`` which runs a list of methods on a model."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bitsmith.data import check_finite, real_tokens
from bitsmith.registry import Registry
from bitsmith.select import Selection, as_selection

METHODS: Registry[Method] = Registry("method", entry_point_group="bitsmith.methods")
register_method = METHODS.register
HOOKS = ("prepare", "calibrate", "perturb", "objective", "penalty", "after_backward", "after_step", "schedule",
         "finalize")  # fmt: skip
TRAINING_HOOKS = ("perturb", "objective", "penalty", "after_backward", "after_step", "schedule")


@dataclass
class Method:
    """Base of every method. The dataclass fields are its configuration (one recipe entry).

    ``where`` selects the layers; ``where.overrides`` sets fields per layer (``layer_config``).
    Subclasses override only the hooks they need.
    """

    description: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""
    doc_page: ClassVar[str] = ""  # its page under docs/methods/ (default: the registered name)
    where: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        self.where = as_selection(self.where)
        field_names = {f.name for f in dataclasses.fields(self)} - {"where"}
        for pattern, fields in self.where.overrides.items():
            unknown = set(fields) - field_names
            if unknown:
                raise ValueError(
                    f"{self.registered_name or type(self).__name__}: override {pattern!r} sets unknown "
                    f"field(s) {sorted(unknown)}; fields are {sorted(field_names)}"
                )

    # -- hooks ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Swap or attach modules; return the ``{layer name: spec}`` map of what changed."""
        return {}

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> None:
        """Collect statistics or run searches on calibration batches."""

    def perturb(self, model: nn.Module, batch: Any) -> Any:
        """Return a perturbed (e.g. adversarial) version of a training batch."""
        return batch

    def objective(self, model: nn.Module, batch: Any) -> Tensor | None:
        """The training loss of ``batch`` in place of the task loss (e.g. per-member losses of an ensemble), or
        None to keep the task loss. The first method that returns one wins."""
        return None

    def penalty(self, model: nn.Module, batch: Any) -> Tensor:
        """A regulariser added to the task loss."""
        return torch.zeros(())

    def after_backward(self, model: nn.Module) -> bool:
        """Called after each training step's backward pass, before the optimizer step: read the gradients
        (e.g. saliencies). Return True when parameters were replaced (the loop skips this step and
        rebuilds its optimizer)."""
        return False

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step, e.g. to project parameters back into their domain (BSQ clamps
        its bit planes to [0, 2] here, as the official code does after every step)."""

    def schedule(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        """Called by the training loop after epoch ``epoch`` (1-based) of ``epochs``, e.g. for periodic
        re-quantization or annealing. Return True when parameters were replaced (the loop then
        rebuilds its optimizer)."""
        return False

    def resume(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called when the training loop resumes a run after epoch ``epoch`` (1-based) of ``epochs``, after
        ``load_state_dict`` and before the model's saved state is loaded: rebuild the module structure the
        schedule had reached (e.g. BSQ's fixed-scheme layers); the values are loaded next."""

    def finalize(self, model: nn.Module) -> None:
        """Make the result hard: quantize, cut ranks, remove channels."""

    # -- run-time state (saved with a training checkpoint) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model's own state: every private attribute (``_name``) the
        hooks set (flags such as "already pruned", score averages, counters), as plain data and tensors.
        A method that keeps anything else overrides this and ``load_state_dict``."""
        return {name: value for name, value in vars(self).items() if name.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (called before the model's state loads on resume)."""
        vars(self).update(state)

    @classmethod
    def hooks(cls) -> list[str]:
        """The hooks this method overrides, in the order of ``HOOKS``."""
        return [hook for hook in HOOKS if cls.uses(hook)]

    @classmethod
    def trains(cls) -> bool:
        """Whether the method joins a training loop (any of ``TRAINING_HOOKS``)."""
        return any(cls.uses(hook) for hook in TRAINING_HOOKS)

    # -- helpers --------------------------------------------------------------------------
    def layer_config(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """This method's fields with a layer's overrides applied."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "where"}
        config.update(overrides)
        return config

    def config(self) -> dict[str, Any]:
        """The recipe entry that reconstructs this method."""
        out = {"name": self.registered_name, **dataclasses.asdict(self)}
        return out

    @classmethod
    def uses(cls, hook: str) -> bool:
        """Whether this method overrides ``hook``."""
        return getattr(cls, hook) is not getattr(Method, hook)


def methods_markdown() -> str:
    """The README's table of registered methods: name, description, hooks, page (``bitsmith methods --markdown``)."""
    lines = ["| method | what it does | hooks | page |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        page = cls.doc_page or name
        hooks = ", ".join(cls.hooks())
        lines.append(f"| `{name}` | {cls.description} | {hooks} | [{page}.md](docs/methods/{page}.md) |")
    return "\n".join(lines)


def method_family(cls: type) -> str:
    """The family package of a method class (``bitsmith.methods.FAMILY.module``), or ``plugin`` for one registered
    from elsewhere."""
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["bitsmith", "methods"] else "plugin"


def families_markdown() -> str:
    """The README's opening list (``bitsmith methods --families``): each family, named by the first words of its
    package docstring, with its registered methods."""
    import importlib

    groups: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        groups.setdefault(method_family(cls), []).append(name)
    lines = []
    for family, names in sorted(groups.items()):
        doc = importlib.import_module(f"bitsmith.methods.{family}").__doc__ or family if family != "plugin" else ""
        title = doc.split(":")[0].strip() or "Plugins"
        lines.append(f"- **{title}** (`methods/{family}/`): " + ", ".join(f"`{n}`" for n in names))
    return "\n".join(lines)


def build_method(entry: dict[str, Any]) -> Method:
    """Construct a method from a recipe entry ``{"name": ..., field: value, ...}``."""
    entry = dict(entry)
    name = entry.pop("name", None)
    if name is None:
        raise ValueError(f"method entry {entry} has no 'name'; registered methods: {METHODS.names()}")
    cls = METHODS.get(name)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"method {name!r} has no field(s) {sorted(unknown)}; fields are {sorted(allowed)}")
    return cls(**entry)


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Batch norms keep normalising by the batch in train mode, but an extra forward pass inside this block
    (a regulariser's) leaves their running statistics as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield model
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch: a dict is passed as keywords, a (inputs, targets) pair by inputs. While it
    runs, ``data.drop_padding`` knows the batch's padding (its ``attention_mask``), so statistics taken in
    hooks and observers see only real tokens."""
    with real_tokens(batch):
        if isinstance(batch, dict):
            return model(**{k: v for k, v in batch.items() if k != "labels"})
        if isinstance(batch, (tuple, list)):
            return model(batch[0])
        return model(batch)


def output_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, a Hugging Face output's ``logits``, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


@torch.no_grad()
def forward_with_hooks(model: nn.Module, batch: Any, hooks: dict[nn.Module, Callable[..., Any]]) -> Any:
    """One forward of ``batch`` in eval mode with ``hooks`` as forward hooks of their modules, removed
    afterwards (also when the forward fails)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with eval_mode(model):
            return run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "values"):  # dicts and HF ModelOutputs
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def first_nonfinite_layer(model: nn.Module, batch: Any) -> str | None:
    """The first module (in execution order) whose output holds NaN or inf on ``batch``, as
    ``'name' (Type)``; None when every output is finite."""
    found: list[str] = []

    def check(module: nn.Module, args: Any, output: Any) -> None:
        if not found and any(not bool(torch.isfinite(t).all()) for t in _tensors(output) if t.is_floating_point()):
            found.append(f"{names[module]!r} ({type(module).__name__})")

    names = {module: name or "(model)" for name, module in model.named_modules()}
    forward_with_hooks(model, batch, {module: check for module in names if not list(module.children())})
    return found[0] if found else None


def describe(batch: Any) -> str:
    """A batch's structure and shapes, e.g. ``tensor 8x1x28x28 float32`` or ``{input_ids 8x12 int64, ...}``."""
    if isinstance(batch, Tensor):
        return f"tensor {'x'.join(map(str, batch.shape)) or 'scalar'} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{key} {describe(value).removeprefix('tensor ')}" for key, value in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(part) for part in batch) + ")"
    return type(batch).__name__


def _signature(batch: Any) -> Any:
    """What must agree between calibration batches: the structure, dtypes and shapes past the batch dim
    (past the sequence dim for integer tensors, e.g. token ids of padded text)."""
    if isinstance(batch, Tensor):
        return (batch.dtype, tuple(batch.shape[1 if batch.is_floating_point() else 2 :]))
    if isinstance(batch, dict):
        return {key: _signature(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return [_signature(part) for part in batch]
    return type(batch)


def check_fits(model: nn.Module, batches: list[Any]) -> None:
    """Refuse calibration batches that differ from the first one or that the model cannot run, with one line
    naming the batch and its shapes (instead of an error deep inside a method's statistics)."""
    if not batches:
        raise ValueError("no calibration batches; give at least one (calib_data=[...])")
    first = _signature(batches[0])
    for index, batch in enumerate(batches[1:], start=1):
        if _signature(batch) != first:
            raise ValueError(f"calibration batch {index} ({describe(batch)}) differs from batch 0 "
                             f"({describe(batches[0])}); every batch needs the same structure and shapes")  # fmt: skip
    try:
        layer = first_nonfinite_layer(model, batches[0])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"calibration batch 0 ({describe(batches[0])}) does not fit the model: {reason}") from exc
    if layer is not None:
        raise FloatingPointError(f"calibration batch 0: the model's first non-finite output is at layer {layer} "
                                 "although the inputs are finite; check that layer's weights")  # fmt: skip


def compress(
    model: nn.Module,
    methods: Method | list[Method],
    calib_data: Iterable[Any] | None = None,
    finalize: bool = True,
) -> dict[str, dict[str, Any]]:
    """Apply the methods in order: each one's ``prepare`` then ``calibrate`` on ``calib_data`` (so a later
    method sees the earlier ones' result, e.g. SmoothQuant's rescaled weights before PTQ, or PTQ's
    quantizers before NoisyQuant); then ``finalize`` of every method.

    Returns the combined ``{layer name: spec}`` map. ``calib_data`` must be re-iterable (a list or a
    DataLoader) when several methods calibrate. With training to follow, pass ``finalize=False`` and
    call each method's ``finalize`` after it (as ``bitsmith run`` does).
    """
    methods = [methods] if isinstance(methods, Method) else list(methods)
    if calib_data is not None and any(method.uses("calibrate") for method in methods):
        calib_data = calib_data if isinstance(calib_data, list) else list(calib_data)  # read once, checked
        check_finite(calib_data)
        check_fits(model, calib_data)
    specs: dict[str, dict[str, Any]] = {}
    for method in methods:
        specs.update(method.prepare(model))
        if method.uses("calibrate"):
            if calib_data is None:
                raise ValueError(f"method {method.registered_name!r} needs calibration data (calib_data=...)")
            method.calibrate(model, calib_data)
    if finalize:
        for method in methods:
            method.finalize(model)
    return specs
