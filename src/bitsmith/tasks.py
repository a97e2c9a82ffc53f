"""Task kinds as a registry, like methods: each kind knows which recipes it serves, how to load their model and
data (the zoo's or the user's own: ``model.factory`` / ``model.path``, ``data.path``), and which recipe sections
it takes. ``bitsmith run`` looks the kind up (``task:`` in the recipe, or the first kind that claims it) and never
branches on dataset names. A third party registers a kind through the ``bitsmith.tasks`` entry point group:

    @register_task("my-task")
    class MyTask(TaskKind):
        order = 50
        def claims(self, recipe): ...
        def load(self, recipe, smoke, source): ...  # (model, task with evaluate / calibration / example / first)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
from torch import nn

from bitsmith.registry import Registry
from bitsmith.saved_runs import SavedRun, score_against_float

if TYPE_CHECKING:
    from bitsmith.eval.tasks import Task
    from bitsmith.recipe import Recipe

SMOKE = {"eval_size": 200, "text_eval_size": 32, "calib_size": 32, "latency_runs": 2, "latency_batch": 16,
         "train_examples": 256, "lm_eval_windows": 2, "lm_calib_windows": 1, "lm_window": 128, "lm_new_tokens": 4,
         "attack_examples": 64}  # fmt: skip


class TaskKind:
    """What a recipe is measured on. ``order``: claims are asked in rising order (the fallback kind last);
    ``labelled``: the task has labelled training images (``train`` and ``attack`` sections are allowed)."""

    registered_name: ClassVar[str]
    order: ClassVar[int] = 50
    labelled: ClassVar[bool] = False
    data_names: ClassVar[tuple[str, ...]] = ()  # the built-in datasets it reads (data.name); "own" data: data.path
    own_data: ClassVar[bool] = True  # whether data.path (the user's own data) is read
    summary: ClassVar[str] = ""  # one line for `bitsmith tasks`

    def claims(self, recipe: Recipe) -> bool:
        return False

    def data_name(self, recipe: Recipe) -> str:
        return "own" if recipe.data.path is not None else self.data_names[0]

    def check(self, recipe: Recipe) -> None:
        """Refuse recipe fields this kind cannot serve (a ``RecipeError`` naming the field)."""
        if recipe.data.path is not None and not self.own_data:
            refuse(f"data.path: the {self.registered_name} task reads {', '.join(self.data_names)} only; remove it")

    def source(self, recipe: Recipe) -> str:
        """What the model comes from (recorded in the report and the run's fingerprint)."""
        spec = recipe.model
        if spec.path is not None:
            return str(Path(spec.path).resolve())
        return str(spec.name or spec.factory)

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        raise NotImplementedError

    def reload(self, saved: SavedRun) -> tuple[nn.Module, nn.Module, Task]:
        """(compressed model, its FP32 original, task) of a saved run, for ``bitsmith eval``."""
        raise ValueError(f"{saved.path}: the {self.registered_name} task cannot score a saved run again")


TASKS: Registry[TaskKind] = Registry("task", entry_point_group="bitsmith.tasks")
register_task = TASKS.register


def saved_run_kind(saved: SavedRun) -> TaskKind:
    """The kind a checkpoint records (``meta["task"]``); one written before kinds were recorded gets the kind
    that claims its model name."""
    if saved.meta.get("task") in TASKS:
        return TASKS.get(saved.meta["task"])()
    from types import SimpleNamespace

    directory = saved.given and Path(saved.name).is_dir()
    model = SimpleNamespace(name=None if directory else saved.name, path=saved.name if directory else None,
                            factory=None)  # fmt: skip
    return task_kind(SimpleNamespace(task=None, model=model))  # type: ignore[arg-type]


def task_kind(recipe: Recipe) -> TaskKind:
    """The recipe's task kind: ``recipe.task`` when given, else the first registered kind that claims it."""
    if recipe.task is not None:
        return TASKS.get(recipe.task)()
    kinds = sorted((cls() for _, cls in TASKS.items()), key=lambda kind: kind.order)
    return next(kind for kind in kinds if kind.claims(recipe))


def refuse(message: str) -> NoReturn:
    from bitsmith.recipe_yaml import RecipeError

    raise RecipeError(message)


def calib_count(recipe: Recipe, smoke: bool, smoke_size: int) -> int:
    return min(recipe.data.calib_size, smoke_size) if smoke else recipe.data.calib_size


@register_task("generation")
class GenerationKind(TaskKind):
    """The zoo DDPM: DDIM samples scored by FID / KID, the noise error against FP32 (``bitsmith.qdiffusion``)."""

    order = 10
    data_names = ("fashion-mnist",)
    own_data = False
    summary = "FID / KID of DDIM samples and the noise error against FP32 (the zoo DDPM)"

    def claims(self, recipe: Recipe) -> bool:
        from bitsmith.zoo import GENERATIVE

        return recipe.model.name == GENERATIVE

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        """A smoke run without a trained DDPM uses fresh seeded weights (noise samples; it exercises the pipeline)."""
        from bitsmith.qdiffusion import generation_task
        from bitsmith.zoo.diffusion import build_ddpm, ddpm_path, pretrained_ddpm

        if smoke and not ddpm_path().is_file():
            torch.manual_seed(recipe.data.seed)
            model = build_ddpm().eval()
        else:
            model = pretrained_ddpm(recipe.data.root)
        return model, generation_task(model, recipe.generation, recipe.data.root, smoke)  # type: ignore[return-value]

    def reload(self, saved: SavedRun) -> tuple[nn.Module, nn.Module, Task]:
        """Scored against the zoo DDPM (the reference of the noise error)."""
        from bitsmith.eval.generative import GenerationSection
        from bitsmith.export.checkpoint import load
        from bitsmith.qdiffusion import generation_task
        from bitsmith.zoo.diffusion import build_ddpm, pretrained_ddpm

        fp32 = pretrained_ddpm(saved.data_root, train_if_missing=False)
        spec = GenerationSection(**saved.meta.get("recipe", {}).get("generation") or {})
        task = generation_task(fp32, spec, saved.data_root)
        task.set_reference(fp32)
        return load(saved.path, build_ddpm()).eval(), fp32, task  # type: ignore[return-value]


RESTORATION_TRAIN = 20_000  # weathered training images


@register_task("restoration")
class RestorationKind(TaskKind):
    """PSNR of an image restorer on weathered Fashion-MNIST (noise, blur, contrast, streaks; several at once): the
    zoo restorer, built fresh from ``data.seed`` and trained from scratch by the recipe's ``train`` section (MSE to the
    clean image), or a model of the user's (``model.factory`` with ``task: restoration``)."""

    order = 15
    labelled = True  # (weathered, clean) pairs: train allowed; check() refuses attacks
    data_names = ("fashion-mnist-weathered",)
    own_data = False
    summary = "PSNR of an image restorer on weathered Fashion-MNIST (zoo restorer or model.factory); train allowed"

    def claims(self, recipe: Recipe) -> bool:
        from bitsmith.zoo import RESTORER

        return recipe.model.name == RESTORER

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.attack is not None:
            refuse("attack: adversarial attacks evaluate classifiers; remove the attack section for restoration")

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        from bitsmith.eval.restoration import restoration_task
        from bitsmith.zoo import RESTORER

        spec, data = recipe.model, recipe.data
        if spec.factory is not None:
            from bitsmith.own_data import build_model

            model = build_model(spec.factory, spec.kwargs, spec.weights)
        elif spec.name == RESTORER:
            from bitsmith.zoo.restorer import ZOO_ARCH, Restorer

            with torch.random.fork_rng():
                torch.manual_seed(data.seed)
                model = Restorer(**ZOO_ARCH).eval()
        else:
            refuse(f"model: the restoration task takes the zoo {RESTORER!r} or a model.factory, not {source[:200]}")
        eval_size = SMOKE["eval_size"] if smoke else (data.eval_size or 10_000)
        train_size = SMOKE["train_examples"] if smoke else RESTORATION_TRAIN
        calib = calib_count(recipe, smoke, SMOKE["calib_size"])
        return model, restoration_task(data.root, eval_size, train_size, calib, data.calib_batch_size, data.seed)  # type: ignore[return-value]


@register_task("classification")
class ClassificationKind(TaskKind):
    """Top-1 accuracy of an image classifier: a zoo classifier (or an ensemble of them) on Fashion-MNIST, or a
    model of the user's (``model.factory``) on Fashion-MNIST or on their image folder (``data.path``)."""

    order = 20
    labelled = True
    data_names = ("fashion-mnist",)
    summary = "top-1 accuracy of an image classifier (zoo, or yours: model.factory); train and attack allowed"

    def claims(self, recipe: Recipe) -> bool:
        from bitsmith.zoo import ZOO

        return recipe.model.name in ZOO or recipe.model.factory is not None

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.data.path is not None and not Path(recipe.data.path).is_dir():
            refuse(f"data.path: {recipe.data.path[:200]} is not a directory; an image folder is ROOT/CLASS/IMAGE")

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        from bitsmith.eval.tasks import classification_task, labelled_task

        data = recipe.data
        eval_size = SMOKE["eval_size"] if smoke else data.eval_size
        calib = calib_count(recipe, smoke, SMOKE["calib_size"])
        critical = recipe.eval.critical_classes
        model = self.model(recipe, smoke)
        if data.path is None:
            return model, classification_task(data.root, eval_size, calib, data.calib_batch_size, data.seed, critical)
        from bitsmith.own_data import image_folder

        splits = image_folder(data.path, data.image_size, data.channels, data.eval_share, data.seed)
        return model, labelled_task(splits.test, splits.train, eval_size, calib, data.calib_batch_size, data.seed,
                                    critical)  # fmt: skip

    def reload(self, saved: SavedRun) -> tuple[nn.Module, nn.Module, Task]:
        """A zoo classifier (its recorded structure: ensembles and splits rebuild); the FP32 model is only timed,
        and the zoo architecture untrained times the same."""
        from bitsmith.eval.tasks import classification_task
        from bitsmith.export.checkpoint import load
        from bitsmith.zoo import ZOO, build_structure

        if saved.name not in ZOO:
            raise ValueError(f"{saved.path}: {saved.name[:200]} is not a zoo classifier; a model of your own "
                             "(model.factory) is scored again with the Python API: bitsmith.load(path, your_model)")  # fmt: skip
        task = classification_task(saved.data_root, None, 1, 1, saved.seed)
        structure = saved.meta.get("structure") if isinstance(saved.meta.get("structure"), dict) else None
        model = load(saved.path, build_structure(saved.name, structure)).eval()
        return model, build_structure(saved.name, structure).eval(), task

    def model(self, recipe: Recipe, smoke: bool) -> nn.Module:
        spec = recipe.model
        if spec.factory is not None:
            from bitsmith.own_data import build_model

            return build_model(spec.factory, spec.kwargs, spec.weights)
        return load_structured_classifier(recipe, smoke)


@register_task("language-model")
class LanguageModelKind(TaskKind):
    """Perplexity, KL and top-1 agreement with FP32, greedy generations of a decoder LLM (zoo or Hugging Face
    directory): on *Persuasion* and the Python docs, or on the user's text (``data.path``)."""

    order = 30
    data_names = ("austen",)
    summary = "perplexity, KL and top-1 agreement with FP32, generations of a decoder LLM (zoo or HF directory)"

    def claims(self, recipe: Recipe) -> bool:
        from bitsmith.zoo import LLM_MODELS
        from bitsmith.zoo.hf_directory import ModelDirectoryError, is_causal_lm

        if recipe.model.path is None:
            return recipe.model.name in LLM_MODELS
        try:  # model.path's validator has checked that config.json is there
            return is_causal_lm(Path(recipe.model.path))
        except (ModelDirectoryError, OSError) as exc:
            refuse(f"model.path: {exc}")

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.model.factory is not None:
            refuse("model.factory: a language model needs its tokenizer; give a Hugging Face directory (model.path)")
        if recipe.data.path is not None and recipe.data.calib_docs_share:
            refuse("data.calib_docs_share: mixes the Python docs into the built-in calibration text; remove it "
                   "with data.path (your text is the calibration text)")  # fmt: skip

    def source(self, recipe: Recipe) -> str:
        from bitsmith.zoo import LLM_MODELS

        if recipe.model.name in LLM_MODELS:
            from bitsmith.zoo.llm import llm_dir

            return str(llm_dir(recipe.model.name))
        return super().source(recipe)

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        from bitsmith.eval.lm import language_model_task, text_language_model_task
        from bitsmith.zoo.llm import load_causal_lm

        data = recipe.data
        model, tokenizer = load_causal_lm(source)
        count = SMOKE["lm_eval_windows"] if smoke else data.eval_size
        calib = calib_count(recipe, smoke, SMOKE["lm_calib_windows"])
        shape = {"window": SMOKE["lm_window"], "kl_windows": count} if smoke else {}
        if data.path is not None:
            from bitsmith.own_data import read_text_records

            text = "\n\n".join(t for t, _ in read_text_records(data.path, data.column))
            task = text_language_model_task(tokenizer, text, count, calib, data.calib_batch_size, data.seed,
                                            data.eval_share, **shape)  # fmt: skip
        else:
            task = language_model_task(tokenizer, count, calib, data.calib_batch_size, data.seed,
                                       docs_share=data.calib_docs_share, **shape)  # fmt: skip
        if smoke:
            task.new_tokens = SMOKE["lm_new_tokens"]
        return model, task

    def reload(self, saved: SavedRun) -> tuple[nn.Module, nn.Module, Task]:
        from bitsmith.eval.lm import language_model_task
        from bitsmith.progress import log
        from bitsmith.zoo import LLM_MODELS
        from bitsmith.zoo.llm import load_llm

        saved.refuse_named_directory(LLM_MODELS)
        log.info(f"loading the float {saved.name[:200]} (the checkpoint's reference)")
        fp32, tokenizer = load_llm(saved.name)
        count = saved.windows or min(int(saved.data.get("eval_size") or 80), 10_000)
        task = language_model_task(tokenizer, count, 1, 1, saved.seed, saved.window, kl_windows=min(16, count))
        return score_against_float(saved, fp32, task)


@register_task("embedding")
class EmbeddingKind(TaskKind):
    """Cosine to the FP32 embeddings (and retrieval recall@1 of paired texts) of a sentence encoder: MiniLM or a
    Hugging Face encoder directory, on docstring pairs or on the user's texts (``data.path``, ``data.column``)."""

    order = 90  # the fallback: a Hugging Face directory that is not a causal LM
    data_names = ("docstrings",)
    summary = "cosine to FP32 embeddings and retrieval recall@1 of a sentence encoder (MiniLM or HF directory)"

    def claims(self, recipe: Recipe) -> bool:
        return recipe.model.factory is None

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.model.factory is not None:
            refuse("model.factory: an encoder needs its tokenizer; give a Hugging Face directory (model.path)")

    def source(self, recipe: Recipe) -> str:
        from bitsmith.zoo import HF_MODELS

        if recipe.model.name in HF_MODELS:
            from bitsmith.zoo.minilm import minilm_dir

            return str(minilm_dir())
        return super().source(recipe)

    def load(self, recipe: Recipe, smoke: bool, source: str) -> tuple[nn.Module, Task]:
        from bitsmith.eval.tasks import embedding_task, text_embedding_task
        from bitsmith.zoo.minilm import load_hf_encoder

        data = recipe.data
        model, tokenizer = load_hf_encoder(source)
        eval_size = SMOKE["text_eval_size"] if smoke else data.eval_size
        calib = calib_count(recipe, smoke, SMOKE["calib_size"])
        if data.path is None:
            return model, embedding_task(tokenizer, eval_size, calib, data.calib_batch_size, data.seed)
        from bitsmith.own_data import read_text_records

        records = read_text_records(data.path, data.column, data.pair_column)
        return model, text_embedding_task(tokenizer, records, eval_size, calib, data.calib_batch_size, data.seed,
                                          data.eval_share)  # fmt: skip

    def reload(self, saved: SavedRun) -> tuple[nn.Module, nn.Module, Task]:
        from bitsmith.eval.tasks import embedding_task
        from bitsmith.progress import log
        from bitsmith.zoo import HF_MODELS
        from bitsmith.zoo.minilm import load_hf_encoder, minilm_dir

        saved.refuse_named_directory(HF_MODELS)
        log.info(f"loading the float {saved.name[:200]} (the checkpoint's reference)")
        fp32, tokenizer = load_hf_encoder(saved.name if saved.given else str(minilm_dir()))
        return score_against_float(saved, fp32, embedding_task(tokenizer, None, 1, 1, saved.seed))


def load_structured_classifier(recipe: Recipe, smoke: bool) -> nn.Module:
    """The recipe's zoo classifier: one model, an Ensemble of ``members`` or a Split-Ensemble (``split``), from the
    trained checkpoint (``init: pretrained``) or fresh seeded weights (``init: scratch``; a split is always fresh)."""
    from bitsmith.data import subset
    from bitsmith.ensemble import Ensemble
    from bitsmith.progress import log
    from bitsmith.split_ensemble import class_groups, penultimate_features
    from bitsmith.zoo import build_structure
    from bitsmith.zoo.data import load_fashion_mnist

    spec, data = recipe.model, recipe.data
    name = str(spec.name)
    if spec.split is not None:
        groups = spec.split
        if isinstance(groups, int):
            images, labels = subset(*load_fashion_mnist("train", data.root), 5000, seed=data.seed)
            cnn = load_classifier(name, data.root, smoke)
            groups = class_groups(penultimate_features(cnn, images), labels, groups)
            log.info(f"split-ensemble class groups (by the trained CNN's class-mean features): {groups}")
        return build_structure(name, {"split": groups}, data.seed)
    if spec.init == "scratch":
        return build_structure(name, {"members": spec.members}, data.seed)
    if spec.members:
        one = load_classifier(name, data.root, smoke)
        return Ensemble([copy.deepcopy(one) for _ in range(spec.members)], torch.zeros(1, 1, 28, 28))
    return load_classifier(name, data.root, smoke)


def load_classifier(name: str, root: str | None, smoke: bool) -> nn.Module:
    """A zoo classifier. A smoke run without a cached checkpoint trains one tiny epoch instead."""
    from bitsmith.data import subset
    from bitsmith.train import TrainConfig, fit
    from bitsmith.zoo import checkpoint_path, get_zoo_model, pretrained
    from bitsmith.zoo.data import load_fashion_mnist

    entry = get_zoo_model(name)
    if checkpoint_path(name).is_file() or not smoke:
        return pretrained(name, root)
    torch.manual_seed(0)
    model = entry.build()
    images, labels = subset(*load_fashion_mnist("train", root), 1000, seed=0)
    fit(model, images, labels, TrainConfig(epochs=1, batch_size=64, optimizer="adamw", lr=2e-3))
    return model.eval()


def load_task(recipe: Recipe, smoke: bool, source: str | None = None) -> tuple[nn.Module, Any]:
    """The recipe's model and the task it is calibrated and evaluated on (``source``: the kind's ``source`` when
    the caller has it already; resolving a zoo LLM verifies its files, which is not free)."""
    kind = task_kind(recipe)
    return kind.load(recipe, smoke, source or kind.source(recipe))
