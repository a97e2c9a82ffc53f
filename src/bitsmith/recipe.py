"""Recipes: YAML with ``model``, ``data``, ``methods``, ``train``, ``eval``, ``export``, validated with
pydantic. Errors name the field path, the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from bitsmith.eval.generative import GenerationSection
from bitsmith.method import METHODS, Method
from bitsmith.recipe_yaml import SHOWN, RecipeError, apply_overrides, find_recipe, read_recipe_file, short_repr
from bitsmith.train import TrainConfig
from bitsmith.zoo import GENERATIVE, HF_MODELS, LLM_MODELS, RESTORER, ZOO


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str | None = Field(None, description="zoo model name (see `bitsmith zoo`)")
    path: str | None = Field(None, description="a Hugging Face model directory (local files only)")
    factory: str | None = Field(
        None, description="your own classifier: a Python import path 'package.module:callable' returning a "
        "torch.nn.Module (the one code bitsmith runs on a recipe's word; files are only ever read as data)")  # fmt: skip
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of model.factory")
    weights: str | None = Field(
        None, description="model.factory's weights: a .safetensors file or a state dict saved with torch.save "
        "(read with weights_only=True)")  # fmt: skip
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="zoo classifiers: the trained checkpoint, or a fresh seeded initialisation (train)"
    )
    members: int | None = Field(None, ge=2, le=16, description="an Ensemble of this many zoo classifiers")
    split: int | list[list[int]] | None = Field(
        None, description="a Split-Ensemble of the zoo CNN: a number of class groups (clustered by the trained CNN's "
        "class-mean features) or the groups themselves; trained from scratch")  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and sum(data.get(k) is not None for k in ("name", "path", "factory")) != 1:
            raise ValueError("give one of a zoo model 'name' (see `bitsmith zoo`), a Hugging Face directory 'path' or "
                             "a Python import path 'factory' ('package.module:callable')")  # fmt: skip
        if isinstance(data, dict) and data.get("factory") is None and (data.get("weights") or data.get("kwargs")):
            raise ValueError("'weights' and 'kwargs' belong to 'factory' (a zoo model or a directory has its own)")
        return data

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value[:SHOWN]} (a .safetensors file or a state dict saved by torch.save)")
        return value

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not Path(value).is_dir():
            what = "a file" if Path(value).exists() else "no such directory"
            raise ValueError(f"{what}; give a Hugging Face model directory (the folder with config.json)")
        if not (Path(value) / "config.json").is_file():
            raise ValueError("no config.json there; give a Hugging Face model directory")
        return value


def _key(part: Any) -> str:
    """A field path part as typed, or quoted (and cut) when it is not a plain name."""
    text = str(part)
    return text if re.fullmatch(r"[\w\-@*.]{1,80}", text) else short_repr(text)


def _reject_bools(cls: type, data: dict[str, Any], prefix: str) -> None:
    """``w_bits: true`` is not 1 bit: a bool is accepted only where the field's type names bool."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in data.items():
        if isinstance(value, bool) and "bool" not in str(hints.get(key, "bool")):
            raise RecipeError(f"{prefix}.{key}: expected a number or a name, got {value!r} (a boolean)")


class DataSpec(_Strict):
    name: Literal["fashion-mnist", "docstrings", "austen", "own"] | None = Field(
        None,
        description="fashion-mnist for zoo classifiers, docstrings (text pairs) for HF encoders, austen (prose) for "
        "decoder LLMs, own for data.path; default: by task",
    )
    path: str | None = Field(
        None, description="your own data: an image folder (ROOT/CLASS/IMAGE, or ROOT/train + ROOT/val) for "
        "classification; for language models and encoders a .txt file, a folder of .txt files, JSON lines, parquet, "
        "or a `datasets` folder (save_to_disk)")  # fmt: skip
    column: str = Field("text", description="data.path's text column (JSON lines, parquet, datasets)")
    pair_column: str | None = Field(
        None, description="encoders: a second text column paired with data.column, for retrieval recall@1"
    )
    image_size: int = Field(224, ge=8, le=1024, description="image folders: images are resized to this square size")
    channels: Literal[1, 3] = Field(3, description="image folders: 1 (grayscale) or 3 (RGB)")
    eval_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="data.path: the share held out for evaluation (images and text records; "
        "for a language model the last share of the text's tokens); an image folder with train/ and val/ is "
        "split as laid out")  # fmt: skip
    root: str | None = Field(None, description="Fashion-MNIST directory (default: BITSMITH_DATA or the Debian path)")

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"no such directory: {value[:SHOWN]} (the data is never taken from elsewhere instead)")
        return value

    calib_size: int = Field(512, ge=1, description="calibration images, sentences or (LLMs) 512-token windows")
    calib_batch_size: int = Field(128, ge=1)
    eval_size: int | None = Field(
        None,
        ge=1,
        description="test images, text pairs or (LLMs) 512-token windows per text to evaluate (all when null)",
    )
    calib_docs_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="LLMs: the share of calibration windows taken from the Python docs (after the text the "
        "evaluation reads) instead of Emma / Mansfield Park, for a model used on text nobody calibrated for",
    )
    seed: int = 0


class EvalSpec(_Strict):
    latency: bool = True
    latency_batch: int = Field(256, ge=1)
    latency_runs: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)
    critical_classes: list[int] | None = Field(
        None, description="classes whose top-1 is reported on its own (critical_accuracy), e.g. [0, 2, 4, 6]"
    )


class ExportSpec(_Strict):
    checkpoint: bool = True
    hf: bool = Field(False, description="also write a Hugging Face directory (hf/) that from_pretrained reloads (LLMs)")
    compressed_tensors: bool = Field(
        False, description="also write a compressed-tensors directory (compressed-tensors/, the format vLLM reads)"
    )
    gguf: bool = Field(
        False,
        description="also write model.gguf (llama.cpp, ollama): Q8_0 / Q4_0 / Q4_1 (and, with a method's grid:, "
        "Q4_K / Q6_K) layers from bitsmith's codes, metadata and tokenizer from the zoo LLM's GGUF (smollm2)",
    )
    gguf_float: Literal["f32", "f16", "q8_0"] = Field(
        "f32", description="model.gguf's unquantized matrices (the embedding): f32, f16, or q8_0 as llama.cpp rounds it"
    )
    deploy: Literal["none", "auto", "onnxruntime", "torchao", "torch"] = Field(
        "none", description="also deploy on this backend and report its metrics and latency next to FP32"
    )


class AttackSection(_Strict):
    """Robust evaluation of the FP32 and the compressed model (zoo classifiers)."""

    attacks: list[Literal["fgsm", "pgd", "autoattack", "autoattack-lite"]] = Field(["pgd"], min_length=1)
    eps: list[float] = Field([0.1], min_length=1, description="strengths in the input's units ([0, 1] images)")
    norm: Literal["inf", "2"] = "inf"
    steps: int = Field(20, ge=1)
    restarts: int = Field(1, ge=1)
    subset: int | None = Field(None, ge=1, description="attack a seeded subset of the test images (all when null)")
    transfer: bool = Field(
        True,
        description="also attack the compressed model with examples crafted on its own "
        "weights in float (same training, no fake quantization in the gradient path)",
    )
    sanity: bool = Field(
        True,
        description="check every PGD number: accuracy falls with eps, a stronger attack never "
        "raises it, an unbounded one reaches 0 % (each failure is flagged)",
    )

    def specs(self) -> list[Any]:
        from bitsmith.robust import attack_specs

        return attack_specs(list(self.attacks), self.eps, self.norm, self.steps, self.restarts)


class CrossbarSection(_Strict):
    """Accuracy of the FP32 and the compressed model run on ReRAM crossbars under sampled read noise."""

    noise: list[float] = Field([0.05], min_length=1, description="read-noise levels (fractions of the conductance "
                               "range), each evaluated")  # fmt: skip
    draws: int = Field(20, ge=1, description="independent noise draws per level (mean and spread reported)")
    rows: int = Field(128, ge=1, description="crossbar size: inputs summed per bit line")
    cell_bits: int = Field(2, ge=1, le=8)
    weight_bits: int = Field(8, ge=1, le=16)
    adc_bits: int | None = Field(None, ge=1, description="ADC resolution per bit line (null: ideal)")
    subset: int | None = Field(2000, ge=1, description="a seeded subset of the test images (all when null)")

    def crossbars(self) -> list[Any]:
        from bitsmith.crossbar import Crossbar

        return [Crossbar(self.rows, self.cell_bits, self.weight_bits, level, self.adc_bits) for level in self.noise]


class Recipe(_Strict):
    task: str | None = Field(None, description="the task kind (`bitsmith tasks`); default: the kind that claims the "
                             "model")  # fmt: skip
    model: ModelSpec
    data: DataSpec = DataSpec()
    methods: list[dict[str, Any]] = Field(default_factory=list)
    train: dict[str, Any] | None = None
    eval: EvalSpec = EvalSpec()
    export: ExportSpec = ExportSpec()
    attack: AttackSection | None = None
    crossbar: CrossbarSection | None = None
    generation: GenerationSection | None = None

    def build_methods(self) -> list[Method]:
        return [validate_method(entry, f"methods.{i}") for i, entry in enumerate(self.methods)]

    def train_config(self) -> TrainConfig | None:
        if self.train is None:
            return None
        return _validate(TrainConfig, self.train, "train")


def _format(err: dict[str, Any], prefix: str) -> str:
    loc = ".".join(_key(p) for p in (prefix, *err["loc"]) if p != "")
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    return f"{loc}: {message}" if isinstance(value, dict) else f"{loc}: {message} (got {short_repr(value)})"


def _validate(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix}: expected a mapping of fields, got {short_repr(data)}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = (
            unknown[0] if unknown[0].isprintable() else short_repr(unknown[0])
        )  # a name with a newline stays on one line
        raise RecipeError(f"{prefix}.{name[:SHOWN]}: unknown field; allowed: {', '.join(sorted(allowed))}")
    _reject_bools(cls, data, prefix)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise RecipeError("; ".join(_format(e, prefix) for e in exc.errors())) from None
    except ValueError as exc:
        raise RecipeError(f"{prefix}: {exc}") from None


def validate_method(entry: dict[str, Any], prefix: str = "method") -> Method:
    """A method instance from a recipe entry, with errors naming ``prefix.field``."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise RecipeError(f"{prefix}: each method needs a 'name'; registered: {', '.join(METHODS.names())}")
    name = entry["name"]
    if name not in METHODS:
        raise RecipeError(f"{prefix}.name: unknown method {short_repr(name)}; registered: {', '.join(METHODS.names())}")
    fields = {k: v for k, v in entry.items() if k != "name"}
    return _validate(METHODS.get(name), fields, prefix)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe; returns the recipe and the resolved raw mapping."""
    raw = read_recipe_file(find_recipe(path))
    return parse_recipe(apply_overrides(raw, overrides or [])), raw


def check_structure(recipe: Recipe) -> None:
    """``model.members`` / ``split`` / ``init``: zoo classifiers only, split of the CNN only, fresh starts train."""
    model = recipe.model
    if model.name not in ZOO and (model.members or model.split is not None or model.init != "pretrained"):
        raise RecipeError("model.members / split / init: ensembles and fresh starts are for zoo classifiers "
                          f"({', '.join(ZOO)})")  # fmt: skip
    if model.split is None:
        if model.init == "scratch" and recipe.train is None:
            raise RecipeError("model.init: scratch starts from random weights; add a train section")
        return
    if model.members:
        raise RecipeError("model: give members (an Ensemble) or split (a Split-Ensemble), not both")
    if model.name != "cnn":
        raise RecipeError(f"model.split: the Split-Ensemble is built from the zoo cnn, not {model.name}")
    if recipe.train is None:
        raise RecipeError("model.split: a Split-Ensemble is trained from scratch; add a train section")
    if isinstance(model.split, int) and not 2 <= model.split <= 10:
        raise RecipeError(f"model.split: {model.split} class groups; choose 2..10")
    if isinstance(model.split, list) and sorted(c for g in model.split for c in g) != list(range(10)):
        raise RecipeError(f"model.split: the groups must partition the classes 0..9 (got {model.split})")


def check_generation(recipe: Recipe) -> None:
    """The DDPM is scored by generation (a default ``generation`` section); the section is the DDPM's only."""
    if recipe.model.name != GENERATIVE:
        if recipe.generation is not None:
            raise RecipeError(f"generation: the generation task is the zoo {GENERATIVE}'s; remove it for "
                              f"{recipe.model.name or recipe.model.path}")  # fmt: skip
        return
    recipe.generation = recipe.generation or GenerationSection()
    gen = recipe.generation
    if gen.calib_steps > gen.sampler_steps:
        raise RecipeError(f"generation.calib_steps {gen.calib_steps}: the sampler has {gen.sampler_steps} steps; "
                          f"choose 1..{gen.sampler_steps}")  # fmt: skip
    if recipe.train is not None or recipe.attack is not None or recipe.eval.critical_classes:
        raise RecipeError("train / attack / eval.critical_classes: the DDPM takes post-training compression only")


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("recipe: expected a mapping with model, data, methods, train, eval, export")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError("; ".join(_format(e, "") for e in exc.errors())) from None
    known = [*ZOO, GENERATIVE, RESTORER, *HF_MODELS, *LLM_MODELS]
    if recipe.model.name is not None and recipe.model.name not in known:
        raise RecipeError(
            f"model.name: unknown model {recipe.model.name!r}; zoo models: {', '.join(known)} (or give 'path')"
        )
    from bitsmith.tasks import TASKS, task_kind

    if recipe.task is not None and recipe.task not in TASKS:
        raise RecipeError(f"task: unknown task {short_repr(recipe.task)}; registered: {', '.join(TASKS.names())}")
    kind = task_kind(recipe)
    recipe.task = kind.registered_name
    expected = kind.data_name(recipe)
    if recipe.data.name not in (None, expected):
        model = recipe.model.name or recipe.model.path or recipe.model.factory
        raise RecipeError(f"data.name: the {recipe.task} task of {model} reads {expected!r} "
                          f"(got {recipe.data.name!r})")  # fmt: skip
    recipe.data.name = expected
    if recipe.data.calib_docs_share and kind.registered_name != "language-model":
        raise RecipeError(f"data.calib_docs_share: only decoder LLMs calibrate on text; the {recipe.task} task has "
                          "no Python docs to mix in (remove it)")  # fmt: skip
    kind.check(recipe)
    check_structure(recipe)
    from bitsmith.zoo.llm import GGUF_MODELS

    if recipe.export.gguf and recipe.model.name not in GGUF_MODELS:
        raise RecipeError("export.gguf: a GGUF file takes its architecture and tokenizer from the zoo LLM's GGUF "
                          "(llama architecture: smollm2); remove it for this model")  # fmt: skip
    bad = [c for c in recipe.eval.critical_classes or [] if not 0 <= c < 10]
    if not kind.labelled and recipe.eval.critical_classes:
        raise RecipeError(f"eval.critical_classes: only classification tasks have classes (remove it for the "
                          f"{recipe.task} task)")  # fmt: skip
    if bad and expected == "fashion-mnist":
        raise RecipeError(f"eval.critical_classes: {bad} are not Fashion-MNIST classes (0..9)")
    if not kind.labelled and recipe.train is not None:
        raise RecipeError(f"train: training needs a labelled classification task; the {recipe.task} task is "
                          "post-training only")  # fmt: skip
    if recipe.attack is not None:
        if not kind.labelled:
            raise RecipeError("attack: robust evaluation attacks image classifiers (classification task); remove it")
        try:
            recipe.attack.specs()
        except ValueError as err:
            raise RecipeError(str(err)) from None
    if recipe.crossbar is not None:
        if not kind.labelled:
            raise RecipeError("crossbar: accuracy under crossbar noise is measured on classifiers; remove it")
        try:
            recipe.crossbar.crossbars()
        except ValueError as err:
            raise RecipeError(str(err)) from None
    check_generation(recipe)
    recipe.build_methods()
    recipe.train_config()
    return recipe
