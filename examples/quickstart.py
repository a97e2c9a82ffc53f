"""Quick start: 4-bit per-channel PTQ of a small model, cost report, packed checkpoint, reload."""

import tempfile
from pathlib import Path

import torch
from torch import nn

import bitsmith


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


torch.manual_seed(0)
model = make_model()
calib = [torch.randn(16, 1, 28, 28) for _ in range(4)]
x = torch.randn(8, 1, 28, 28)
reference = model(x)

fp32 = bitsmith.model_cost(model, x).totals
method = bitsmith.build_method({"name": "ptq", "w_bits": 4, "a_bits": 8, "w_observer": "mse"})
bitsmith.compress(model, method, calib)
w4a8 = bitsmith.model_cost(model, x).totals
cos = nn.functional.cosine_similarity(model(x).flatten(), reference.flatten(), dim=0)
print(f"FP32 size {fp32['size_bytes']:>9,} B  BOPs {fp32['bops']:.3e}")
print(f"W4A8 size {w4a8['size_bytes']:>9,} B  BOPs {w4a8['bops']:.3e}  cosine to FP32 {cos:.4f}")

with tempfile.TemporaryDirectory() as tmp:
    path = bitsmith.save(model, Path(tmp) / "w4a8.safetensors")
    reloaded = bitsmith.load(path, make_model())
    same = torch.equal(reloaded(x), model(x))
    print(f"checkpoint {path.stat().st_size:,} B; reloaded outputs identical: {same}")
