"""Evaluation tasks: the data a model is calibrated on and the metrics it is measured with.

* :class:`ClassificationTask` — Fashion-MNIST top-1 ``accuracy`` for the zoo classifiers, and
  ``critical_accuracy`` (top-1 on the test images of the critical classes) when some are named.
* :class:`EmbeddingTask` — for sentence encoders (MiniLM or any local HF encoder): ``cosine``, the
  mean cosine similarity of the model's embeddings to the FP32 model's, and ``retrieval``, recall@1
  of each docstring summary retrieving its own docstring body among all evaluated pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from bitsmith.critical import critical_mask
from bitsmith.data import batches, first_example, subset
from bitsmith.method import eval_mode
from bitsmith.train import predict


class ImageBatches:
    """What image tasks share: ``test`` is (inputs, targets), ``calibration`` a list of input batches."""

    test: tuple[Tensor, Tensor]
    calibration: list[Tensor]

    @property
    def eval_examples(self) -> int:
        return int(self.test[0].shape[0])

    @property
    def calib_examples(self) -> int:
        return sum(int(x.shape[0]) for x in self.calibration)

    def example(self, batch_size: int) -> Tensor:
        return self.test[0][:batch_size]

    def first(self, batch: Tensor) -> Tensor:
        return first_example(batch)


@dataclass
class ClassificationTask(ImageBatches):
    """Top-1 accuracy on ``test``; calibration batches of images; ``train`` for training methods."""

    test: tuple[Tensor, Tensor]
    train: tuple[Tensor, Tensor]
    calibration: list[Tensor]
    critical: list[int] | None = None
    calib_labels: Tensor | None = field(default=None, repr=False)
    kind: str = "classification"

    @property
    def labelled_calibration(self) -> list[tuple[Tensor, Tensor]]:
        """The calibration batches with their true labels (for label-aware sensitivities)."""
        if self.calib_labels is None:
            raise ValueError("this task was built without calibration labels")
        return list(zip(self.calibration, self.calib_labels.split([x.shape[0] for x in self.calibration]), strict=True))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        images, labels = self.test
        correct = (predict(model, images) == labels).float()
        out = {"accuracy": float(correct.mean())}
        if self.critical:
            out["critical_accuracy"] = float(correct[critical_mask(labels, self.critical)].mean())
        return out


@dataclass
class EmbeddingTask:
    """Cosine to the FP32 embeddings and retrieval recall@1 on (query, passage) text pairs."""

    tokenizer: Any
    pairs: list[tuple[str, str]]
    calib_texts: list[str]
    calib_batch_size: int = 32
    reference: Tensor | None = field(default=None, repr=False)
    kind: str = "embedding"

    @property
    def eval_examples(self) -> int:
        return len(self.pairs)

    @property
    def calib_examples(self) -> int:
        return len(self.calib_texts)

    @property
    def calibration(self) -> list[dict[str, Tensor]]:
        from bitsmith.zoo.minilm import tokenize

        size = self.calib_batch_size
        return [tokenize(self.tokenizer, self.calib_texts[i : i + size]) for i in range(0, len(self.calib_texts), size)]

    def example(self, batch_size: int) -> dict[str, Tensor]:
        from bitsmith.zoo.minilm import tokenize

        texts = [text for pair in self.pairs for text in pair if text]
        return tokenize(self.tokenizer, (texts * (1 + batch_size // max(len(texts), 1)))[:batch_size])

    def first(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The first example cut to its real tokens, so that costs (MACs, BOPs) do not count padding."""
        one = first_example(batch)
        length = int(one["attention_mask"].sum())
        return {key: value[:, :length] if value.dim() >= 2 else value for key, value in one.items()}

    @property
    def paired(self) -> bool:
        """Whether the pairs have passages (retrieval is scored); a user's single text column has none."""
        return any(passage for _, passage in self.pairs)

    def embeddings(self, model: nn.Module) -> Tensor:
        """Embeddings of all queries, then all passages ``(2 * pairs, dim)`` (queries only when not ``paired``)."""
        from bitsmith.zoo.minilm import embed_texts

        texts = [q for q, _ in self.pairs] + ([p for _, p in self.pairs] if self.paired else [])
        with eval_mode(model):
            return embed_texts(model, self.tokenizer, texts)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from bitsmith.zoo.minilm import mean_cosine, retrieval_recall_at_1

        out = self.embeddings(model)
        if self.reference is None:  # the first model evaluated is the FP32 reference
            self.reference = out
        n = len(self.pairs)
        scores = {"cosine": mean_cosine(out, self.reference)}
        if self.paired:
            scores["retrieval"] = retrieval_recall_at_1(out[:n], out[n:])
        return scores


def classification_task(
    root: str | None,
    eval_size: int | None,
    calib_size: int,
    calib_batch_size: int,
    seed: int,
    critical: list[int] | None = None,
) -> ClassificationTask:
    """Fashion-MNIST: ``eval_size`` test images (all when None), ``calib_size`` training images;
    ``critical`` classes get their own accuracy."""
    from bitsmith.zoo.data import load_fashion_mnist

    test, train = load_fashion_mnist("test", root), load_fashion_mnist("train", root)
    return labelled_task(test, train, eval_size, calib_size, calib_batch_size, seed, critical)


def labelled_task(
    test: tuple[Tensor, Tensor],
    train: tuple[Tensor, Tensor],
    eval_size: int | None,
    calib_size: int,
    calib_batch_size: int,
    seed: int,
    critical: list[int] | None = None,
) -> ClassificationTask:
    """Any labelled images (Fashion-MNIST, a user's image folder): ``eval_size`` of ``test`` (all when None),
    ``calib_size`` calibration images drawn from ``train``."""
    test = subset(*test, eval_size, seed=seed)
    calib_images, calib_labels = subset(*train, calib_size, seed=seed + 1)
    calib = [x for x, _ in batches(calib_images, calib_labels, calib_batch_size)]
    return ClassificationTask(test=test, train=train, calibration=calib, critical=critical, calib_labels=calib_labels)


CALIB_PAIRS = 100  # docstring pairs held out for calibration; the rest are evaluated


def embedding_task(
    tokenizer: Any, eval_size: int | None, calib_size: int, calib_batch_size: int, seed: int
) -> EmbeddingTask:
    """Docstring pairs shuffled with ``seed``: 100 pairs (200 sentences) are the calibration pool,
    up to ``eval_size`` of the rest are evaluated."""
    from bitsmith.zoo.text import docstring_pairs

    pairs = docstring_pairs()
    random.Random(seed).shuffle(pairs)
    calib_pairs, eval_pairs = pairs[:CALIB_PAIRS], pairs[CALIB_PAIRS:]
    calib_texts = [text for pair in calib_pairs for text in pair][:calib_size]
    return EmbeddingTask(tokenizer, eval_pairs[:eval_size] if eval_size else eval_pairs, calib_texts, calib_batch_size)


def text_embedding_task(
    tokenizer: Any, records: list[tuple[str, str]], eval_size: int | None, calib_size: int, calib_batch_size: int,
    seed: int, eval_share: float,
) -> EmbeddingTask:  # fmt: skip
    """A user's own texts (``data.path``, ``data.column``; with ``data.pair_column`` each record's paired text, so
    that retrieval recall@1 is scored too): an ``eval_share`` of the records is evaluated, the rest calibrate."""
    from bitsmith.own_data import split_records

    calib_records, eval_records = split_records(records, eval_share, seed)
    calib_texts = [text for pair in calib_records for text in pair if text][:calib_size]
    return EmbeddingTask(tokenizer, eval_records[:eval_size] if eval_size else eval_records, calib_texts,
                         calib_batch_size)  # fmt: skip


from bitsmith.eval.lm import LanguageModelTask  # noqa: E402  (after the tasks it sits beside)

Task = ClassificationTask | EmbeddingTask | LanguageModelTask
