"""Detection scenes, the CenterNet-style detector's encode / decode / mAP, and DPatch: the untargeted patch raises
the detector's loss beyond what a random patch does, the targeted one lowers the loss of "the patch is the target"."""

from __future__ import annotations

import math

import pytest
import torch

from bitsmith.robust.dpatch import paste, train_dpatch
from bitsmith.zoo.detector import STRIDE, CenterDetector, decode, encode, mean_average_precision
from bitsmith.zoo.scenes import compose


def items(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 8:20] = 0.5 + 0.5 * torch.rand(n, 1, 16, 12, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen)


def test_scenes_hold_one_to_four_items_inside_the_canvas_without_overlap() -> None:
    scenes = compose(*items(), count=30, size=64, seed=0)
    assert scenes.images.shape == (30, 1, 64, 64)
    for image, boxes, labels in zip(scenes.images, scenes.boxes, scenes.labels, strict=True):
        assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        for i in range(len(boxes)):
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            assert image[0, y1:y2, x1:x2].max() > 0.4  # the item is where its box says
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert a[0] >= b[2] or a[2] <= b[0] or a[1] >= b[3] or a[3] <= b[1]
    with pytest.raises(ValueError, match="fit a 32-pixel canvas"):
        compose(*items(), count=1, size=32, max_scale=1.5)


def test_heads_that_predict_the_encoded_targets_decode_to_the_boxes_at_map_one() -> None:
    scenes = compose(*items(), count=8, size=64, seed=1)
    targets = [{"boxes": b, "labels": c} for b, c in zip(scenes.boxes, scenes.labels, strict=True)]
    goal, where, sizes, offsets = encode(targets, 10, torch.Size([64 // STRIDE, 64 // STRIDE]))
    heat = torch.logit(goal.clamp(1e-4, 1 - 1e-4))
    size, offset = torch.zeros(8, 2, 16, 16), torch.zeros(8, 2, 16, 16)
    n, y, x = where.unbind(1)
    size[n, :, y, x], offset[n, :, y, x] = sizes, offsets
    found = decode(heat, size, offset, top=20, min_score=0.5)
    for f, t in zip(found, targets, strict=True):
        assert len(f["boxes"]) == len(t["boxes"])
    assert mean_average_precision(found, targets) == pytest.approx(1.0)
    assert sizes[0].tolist() == pytest.approx([math.log(float(targets[0]["boxes"][0][2] - targets[0]["boxes"][0][0])),
                                               math.log(float(targets[0]["boxes"][0][3] - targets[0]["boxes"][0][1]))])  # fmt: skip


def detector_and_data() -> tuple[CenterDetector, torch.Tensor, list]:
    torch.manual_seed(0)
    scenes = compose(*items(), count=48, size=32, max_scale=1.0, seed=2)
    targets = [{"boxes": b, "labels": c} for b, c in zip(scenes.boxes, scenes.labels, strict=True)]
    detector = CenterDetector(width=8)
    optimizer = torch.optim.Adam(detector.parameters(), lr=5e-3)
    for step in range(60):  # a little training: an untrained detector's output hardly depends on its input
        rows = [(step * 16 + i) % 48 for i in range(16)]
        loss = sum(detector.losses(scenes.images[rows], [targets[r] for r in rows]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return detector.eval(), scenes.images, targets


def test_the_untargeted_patch_raises_the_loss_beyond_a_random_patch() -> None:
    detector, images, targets = detector_and_data()
    patch = train_dpatch(detector, images, targets, patch_size=8, steps=30, batch_size=16, lr=0.05)

    def loss_with(p: torch.Tensor) -> float:
        patched = paste(images, p, torch.Generator().manual_seed(7))[0]
        with torch.no_grad():
            return float(sum(detector.losses(patched, targets).values()))

    assert loss_with(patch) > loss_with(torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))) * 1.2
    assert all(p.requires_grad for p in detector.parameters())  # the detector is handed back as it was


def test_the_targeted_patch_becomes_the_target_class_where_it_is_pasted() -> None:
    detector, images, targets = detector_and_data()
    patch = train_dpatch(detector, images, targets, patch_size=8, steps=30, batch_size=16, lr=0.05, target=3)
    random_patch = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))

    def target_loss(p: torch.Tensor) -> float:
        patched, boxes = paste(images, p, torch.Generator().manual_seed(7))
        goal = [{"boxes": b[None], "labels": torch.tensor([3])} for b in boxes]
        with torch.no_grad():
            return float(sum(detector.losses(patched, goal).values()))

    assert target_loss(patch) < 0.8 * target_loss(random_patch)


def test_a_patch_larger_than_the_image_is_one_line() -> None:
    with pytest.raises(ValueError, match="a 40x40 patch does not fit 32x32 images"):
        paste(torch.rand(2, 1, 32, 32), torch.rand(1, 40, 40), torch.Generator().manual_seed(0))
