"""Distillation from a frozen teacher: the outputs of named modules of the student during its training forward, the
same modules' outputs in the teacher on the same batch, and the losses that compare them (FAR's block outputs,
distill-qat's features, representation and logits)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from bitsmith.method import forward_with_hooks


def first(output: Any) -> Tensor:
    """A module's output tensor (Hugging Face modules return tuples)."""
    return output[0] if isinstance(output, tuple) else output


class OutputRecorder:
    """Forward hooks on ``names`` of ``model`` that keep each module's latest output of a forward run with gradients
    enabled (a training forward: the loss needs its graph); evaluation forwards keep nothing."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if torch.is_grad_enabled():
                self.outputs[name] = first(output)

        return keep

    def take(self) -> dict[str, Tensor]:
        """The recorded outputs, forgotten here (their graphs are freed with the loss)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.outputs = [], {}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of ``model`` as it is now, in eval mode, with no trainable parameters."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def teacher_outputs(teacher: nn.Module, names: list[str], batch: Any) -> tuple[dict[str, Tensor], Any]:
    """The outputs of ``names`` in ``teacher`` on ``batch``, and the teacher's own output."""
    outputs: dict[str, Tensor] = {}
    named: dict[nn.Module, list[str]] = {}  # (one hook per module, whatever names it goes by)
    for name in names:
        named.setdefault(teacher.get_submodule(name), []).append(name)
    hooks = {module: lambda m, a, out, these=these: outputs.update(dict.fromkeys(these, first(out)))
             for module, these in named.items()}  # fmt: skip
    return outputs, forward_with_hooks(teacher, batch, hooks)


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """``||s - t||^2 / ||t||^2`` over the whole tensor: a feature loss that does not depend on the features' scale."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-12)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation loss: ``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    log_student = torch.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher_logits / temperature, dim=-1)
    kl = nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
