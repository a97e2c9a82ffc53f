"""A small anchor-free object detector in plain PyTorch (CenterNet's design: Zhou, Wang, Krähenbühl, "Objects as
Points", 2019), trained from scratch on the Fashion-MNIST scenes (``bitsmith.zoo.scenes``).

A convolutional backbone downsamples by ``STRIDE`` = 4 and adds a global context vector (the features' mean, through
a 1x1 convolution: every cell sees the whole image, as in YOLO's fully connected layers); three heads predict per cell a class heatmap (sigmoid), the
box size in pixels (``log`` of width and height) and the centre's sub-cell offset. Training: CenterNet's focal loss
on Gaussian-splatted centre heatmaps, L1 on size and offset at the true centres. Detection: the heatmap's local
maxima (3x3 max pooling: no NMS needed) above a score, the top ``max_detections``. The interface follows
torchvision's detectors: ``model(images)`` returns one dict per image with ``boxes`` (x1, y1, x2, y2), ``scores``
and ``labels``; ``model.losses(images, targets)`` the training losses (what DPatch ascends).

Why not torchvision's Faster R-CNN / FCOS: the torchvision wheel available here does not load with this CPU build of
PyTorch (its ``torchvision::nms`` operator is missing), and the Adversarial Robustness Toolbox's detector wrapper
imports torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE = 4


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class CenterDetector(nn.Module):
    """Backbone (stride 4) and the heatmap, size and offset heads."""

    def __init__(self, classes: int = 10, width: int = 32, max_detections: int = 20, min_score: float = 0.05) -> None:
        super().__init__()
        self.classes, self.max_detections, self.min_score = classes, max_detections, min_score
        self.backbone = nn.Sequential(_block(1, width, 2), _block(width, 2 * width, 2), _block(2 * width, 2 * width),
                                      _block(2 * width, 2 * width))  # fmt: skip
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * width, 2 * width, 1), nn.ReLU())
        self.heatmap = nn.Sequential(_block(2 * width, width), nn.Conv2d(width, classes, 1))
        self.size = nn.Sequential(_block(2 * width, width), nn.Conv2d(width, 2, 1))
        self.offset = nn.Sequential(_block(2 * width, width), nn.Conv2d(width, 2, 1))
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))  # CenterNet's prior: p = 0.1

    def heads(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.backbone(images)
        features = features + self.context(features)  # a global context vector, as YOLO's fully connected layers
        return self.heatmap(features), self.size(features), self.offset(features)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        heat, size, offset = self.heads(images)
        return decode(heat, size, offset, self.max_detections, self.min_score)

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """CenterNet's training losses for ``targets`` (one dict per image with ``boxes`` and ``labels``)."""
        heat, size, offset = self.heads(images)
        goal, where, goal_size, goal_offset = encode(targets, self.classes, heat.shape[-2:])
        logp, log1mp = F.logsigmoid(heat), F.logsigmoid(-heat)
        p = heat.sigmoid()
        positive = goal.eq(1).float()
        focal = -(positive * (1 - p) ** 2 * logp + (1 - positive) * (1 - goal) ** 4 * p**2 * log1mp).sum()
        count = positive.sum().clamp(min=1)
        n, y, x = where.unbind(1) if len(where) else (torch.zeros(0, dtype=torch.long),) * 3
        return {"heatmap": focal / count,
                "size": F.l1_loss(size[n, :, y, x], goal_size, reduction="sum") / count,
                "offset": F.l1_loss(offset[n, :, y, x], goal_offset, reduction="sum") / count}  # fmt: skip


def encode(targets: list[dict[str, Tensor]], classes: int, shape: torch.Size) -> tuple[Tensor, ...]:
    """Heatmaps with a Gaussian at every centre (radius from the box size), the centres' cells (``k x 3``: image,
    row, column), their log sizes and offsets."""
    h, w = int(shape[0]), int(shape[1])
    goal = torch.zeros(len(targets), classes, h, w)
    where, sizes, offsets = [], [], []
    ys, xs = torch.arange(h).view(-1, 1).float(), torch.arange(w).view(1, -1).float()
    for n, target in enumerate(targets):
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            cx, cy = float(box[0] + box[2]) / 2 / STRIDE, float(box[1] + box[3]) / 2 / STRIDE
            bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
            sigma = max(0.5, min(bw, bh) / STRIDE / 6)
            col, row = min(int(cx), w - 1), min(int(cy), h - 1)
            gauss = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma**2))
            goal[n, int(label)] = torch.maximum(goal[n, int(label)], gauss)
            where.append([n, row, col])
            sizes.append([math.log(bw), math.log(bh)])
            offsets.append([cx - col, cy - row])

    def rows_of(rows: list[list[float]], width: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(rows, dtype=dtype).reshape(-1, width)

    return goal, rows_of(where, 3, torch.long), rows_of(sizes, 2), rows_of(offsets, 2)


def decode(heat: Tensor, size: Tensor, offset: Tensor, top: int, min_score: float) -> list[dict[str, Tensor]]:
    """Local maxima of the heatmap as boxes in pixels."""
    scores = heat.sigmoid()
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    n, classes, h, w = peaks.shape
    out = []
    for i in range(n):
        values, index = peaks[i].flatten().topk(min(top, classes * h * w))
        keep = values > min_score
        values, index = values[keep], index[keep]
        label, cell = index // (h * w), index % (h * w)
        row, col = cell // w, cell % w
        cx = (col.float() + offset[i, 0, row, col]) * STRIDE
        cy = (row.float() + offset[i, 1, row, col]) * STRIDE
        bw, bh = size[i, 0, row, col].exp(), size[i, 1, row, col].exp()
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        out.append({"boxes": boxes, "scores": values, "labels": label})
    return out


def mean_average_precision(predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                           classes: int = 10) -> float:  # fmt: skip
    """mAP at IoU 0.5 by pycocotools' COCO evaluation (all areas, up to 100 detections per image)."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: Tensor) -> list[float]:
        x1, y1, x2, y2 = (float(v) for v in box)
        return [x1, y1, x2 - x1, y2 - y1]

    truth = {"images": [{"id": i} for i in range(len(targets))], "categories": [{"id": c + 1} for c in range(classes)],
             "annotations": [{"id": len(targets) * 100 + k, "image_id": i, "category_id": int(label) + 1,
                              "bbox": xywh(box), "area": xywh(box)[2] * xywh(box)[3], "iscrowd": 0}
                             for i, t in enumerate(targets)
                             for k, (box, label) in enumerate(zip(t["boxes"], t["labels"], strict=True))]}  # fmt: skip
    for k, annotation in enumerate(truth["annotations"]):
        annotation["id"] = k + 1
    found = [{"image_id": i, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(score)}
             for i, p in enumerate(predictions)
             for box, label, score in zip(p["boxes"], p["labels"], p["scores"], strict=True)]  # fmt: skip
    if not found:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(found), "bbox")
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])
