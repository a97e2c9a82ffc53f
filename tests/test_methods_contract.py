"""Contract: every registered method runs its hooks on tiny models, and its config round-trips.

A new method is covered by registering it. ``TINY_CONFIG`` may give fields that keep a method fast.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bitsmith import METHODS, build_method, compress, load, model_cost, run_forward, save, strip
from bitsmith.method import HOOKS
from conftest import (
    make_cnn,
    make_ddpm,
    make_ensemble,
    make_llama,
    make_restorer,
    make_split_ensemble,
    make_vit,
    noisy_batches,
    token_batches,
)

TINY_CONFIG: dict[str, dict] = {
    "smoothquant": {"layers": "all"},
    "noisyquant": {"grid": 4, "rows": 64},
    "gptq": {"group_size": 32},
    "rtn": {"per_channel_fallback": True},  # the tiny CNN's layers have 9..72 inputs
    "awq": {"group_size": 32, "n_grid": 4},
    "liftquant": {"group": 4, "hadamard": 16, "codebook_steps": 30, "codebook_restarts": 1},
    "mobiquant": {"group_size": 32, "router_steps": 10},
    "npft": {"steps": 2, "rounds": 1, "fisher_batches": 1},
    "precision_routing": {"windows": 2, "steps": 10},
    "factorllm": {"router_steps": 5, "steps": 2},
    "gemq": {"group_size": 32, "gradient_windows": 2},
    "pat": {"target": 48, "steps": 3, "hsm_rank": 4},
    "hidden-prune": {"target": 48, "steps": 2},
    "t-rex": {"where": {"types": ["Linear"]}},
    "dverge": {"steps": 2},
    "clat": {"steps": 2, "budget": 0.3},
    "safer": {"steps": 2, "layers": 2},
    "adv-train": {"steps": 2},
    "mat": {"steps": 2},
    "brecq": {"iters": 5},
    "q-diffusion": {"iters": 5},
    "far": {"distill_steps": 3, "joint_steps": 2, "keep": 0.8},
    "distill-qat": {"features": ["conv"], "representation": "fc1"},
    "sparse-attention-replace": {"count": 1, "distill_steps": 3, "joint_steps": 2},
    "token-prune": {"distill_steps": 3},
}
MODELS = {
    "nvit": make_vit,
    "far": make_vit,
    "sparse-attention-replace": make_vit,
    "token-prune": make_vit,
    "sqap": make_vit,
    "gptq": make_llama,
    "awq": make_llama,
    "liftquant": make_llama,
    "mobiquant": make_llama,
    "npft": make_llama,
    "precision_routing": make_llama,
    "factorllm": make_llama,
    "gemq": make_llama,
    "pat": make_llama,
    "hidden-prune": make_llama,
    "ensemble": make_ensemble,
    "dverge": make_ensemble,
    "hce": make_ensemble,
    "sharpbalance": make_ensemble,
    "split-ensemble": make_split_ensemble,
    "safer": make_vit,
    "q-diffusion": make_ddpm,
    "mofme": make_restorer,
}  # methods that need another architecture
DECODER_LMS = {
    "gptq",
    "awq",
    "liftquant",
    "mobiquant",
    "npft",
    "precision_routing",
    "factorllm",
    "gemq",
    "pat",
    "hidden-prune",
}  # calibrated on token batches, block by block
DIFFUSION = {"q-diffusion"}  # calibrated on (x_t, t) batches of a tiny diffusers U-Net
PRELUDE: dict[str, list[dict]] = {
    "noisyquant": [{"name": "ptq", "a_bits": 6, "a_symmetric": True}],
    "precision_routing": [{"name": "mobiquant", "group_size": 32, "router": False}],
    "gemq": [{"name": "factorllm", "router_steps": 5}],
}  # runs first


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, tmp_path: Path, images: torch.Tensor, calib: list) -> None:
    cls = METHODS.get(name)
    assert cls.description, f"method {name!r} needs a one-line description"
    assert any(cls.uses(h) for h in HOOKS), f"method {name!r} implements no hook"
    method = build_method({"name": name, **TINY_CONFIG.get(name, {})})
    assert build_method(copy.deepcopy(method.config())).config() == method.config()

    make_model = MODELS.get(name, make_cnn)
    model = make_model()
    if name in DECODER_LMS:
        calib = token_batches()
        images = calib[0]["input_ids"]

        def call(m: torch.nn.Module) -> torch.Tensor:
            return m(input_ids=images).logits
    elif name in DIFFUSION:
        calib = noisy_batches()

        def call(m: torch.nn.Module) -> torch.Tensor:
            return m(**calib[0])
    else:

        def call(m: torch.nn.Module) -> torch.Tensor:
            return m(images)

    reference = call(model)
    compress(model, [*(build_method(entry) for entry in PRELUDE.get(name, [])), method], calib)
    if cls.uses("penalty") or cls.uses("perturb"):
        batch = method.perturb(model, calib[0])
        loss = torch.nn.functional.cross_entropy(run_forward(model, batch), batch[1]) + method.penalty(model, batch)
        loss.backward()
    if cls.uses("objective"):
        method.objective(model, calib[0]).backward()
    out = call(model)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert model_cost(model, calib[0] if name in DECODER_LMS | DIFFUSION else images).totals["size_bits"] > 0

    reloaded = load(save(model, tmp_path / f"{name}.safetensors"), make_model())
    assert torch.equal(call(reloaded), out)
    assert call(strip(model)).shape == reference.shape


def test_registry_rejects_duplicates_and_names_options() -> None:
    from bitsmith.methods.ptq.ptq import PTQ

    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("ptq")(type("Other", (PTQ,), {}))
    with pytest.raises(KeyError, match="registered: .*ptq"):
        METHODS.get("nope")
    with pytest.raises(ValueError, match="no field"):
        build_method({"name": "ptq", "bitz": 3})


def test_plugins_register_through_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import dataclass

    from bitsmith.method import Method
    from bitsmith.registry import Registry

    registry: Registry = Registry("method", entry_point_group="bitsmith.methods")

    class FakeEntryPoint:
        def load(self) -> None:
            @registry.register("plugin-method")
            @dataclass
            class Plugin(Method):
                description = "a third-party method"

    monkeypatch.setattr(
        "bitsmith.registry.entry_points", lambda group: [FakeEntryPoint()] if group == "bitsmith.methods" else []
    )
    assert registry.names() == ["plugin-method"]
