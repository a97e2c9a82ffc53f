"""Recipes: YAML with ``model``, ``data``, ``methods``, ``train``, ``eval``, ``export``, validated with
pydantic. Errors name the field path, the bad value and what is allowed."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from bitsmith.method import METHODS, Method
from bitsmith.train import TrainConfig
from bitsmith.zoo import HF_MODELS, LLM_MODELS, ZOO

GENERATIVE = "ddpm"  # the zoo's diffusion model (bitsmith.zoo.diffusion), scored by the generation task


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the field path, the value and what is allowed."""


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few hundred bytes; anything near this is not one
MAX_RECIPE_VALUES = 100_000  # values after YAML alias expansion (an alias bomb expands exponentially)
MAX_RECIPE_DEPTH = 64  # nested mappings / lists; a recipe nests three or four deep
SHOWN = 80  # characters of a bad value quoted in an error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str | None = Field(None, description="zoo model name (see `bitsmith zoo`)")
    path: str | None = Field(None, description="a Hugging Face model directory (local files only)")
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
        if isinstance(data, dict) and (data.get("name") is None) == (data.get("path") is None):
            raise ValueError("give either a zoo model 'name' (see `bitsmith zoo`) or a Hugging Face directory 'path'")
        return data

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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def _key(part: Any) -> str:
    """A field path part as typed, or quoted (and cut) when it is not a plain name."""
    text = str(part)
    return text if re.fullmatch(r"[\w\-@*.]{1,80}", text) else _short(text)


def count_values(data: Any, limit: int = MAX_RECIPE_VALUES) -> int:
    """Values in ``data`` with YAML aliases expanded, counting stops past ``limit`` (so a bomb is cheap)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


def _reject_bools(cls: type, data: dict[str, Any], prefix: str) -> None:
    """``w_bits: true`` is not 1 bit: a bool is accepted only where the field's type names bool."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in data.items():
        if isinstance(value, bool) and "bool" not in str(hints.get(key, "bool")):
            raise RecipeError(f"{prefix}.{key}: expected a number or a name, got {value!r} (a boolean)")


class DataSpec(_Strict):
    name: Literal["fashion-mnist", "docstrings", "austen"] | None = Field(
        None,
        description="fashion-mnist for zoo classifiers, docstrings (text pairs) for HF encoders, austen (prose) for "
        "decoder LLMs; default: by model",
    )
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
        description="also write model.gguf (llama.cpp, ollama): Q8_0 / Q4_0 / Q4_1 layers from "
        "bitsmith's codes, metadata and tokenizer from the zoo LLM's GGUF (smollm2)",
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


class GenerationSection(_Strict):
    """The zoo DDPM's generation task: DDIM samples scored by FID / KID on zoo-CNN features, the noise error against
    FP32, and calibration inputs from the FP32 sampler's trajectories."""

    samples: int = Field(2000, ge=1, le=100_000, description="generated images scored against as many test images")
    sampler_steps: int = Field(50, ge=1, le=1000, description="DDIM steps (the schedule has 1,000 time steps)")
    seed: int = 0
    calib_samples: int = Field(64, ge=1, le=10_000, description="FP32 trajectories the calibration inputs come from")
    calib_steps: int = Field(20, ge=1, description="time steps kept per trajectory, spread over the sampler's steps")
    calib_uniform: bool = Field(True, description="false: the single-step baseline (every input at calib_timestep)")
    calib_timestep: int = Field(800, ge=0, le=999, description="the single-step baseline's time step (0..999)")
    trajectories: int = Field(16, ge=1, le=1000, description="FP32 trajectories the per-step noise error is taken on")


class Recipe(_Strict):
    model: ModelSpec
    data: DataSpec = DataSpec()
    methods: list[dict[str, Any]] = Field(default_factory=list)
    train: dict[str, Any] | None = None
    eval: EvalSpec = EvalSpec()
    export: ExportSpec = ExportSpec()
    attack: AttackSection | None = None
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
    return f"{loc}: {message}" if isinstance(value, dict) else f"{loc}: {message} (got {_short(value)})"


def _validate(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix}: expected a mapping of fields, got {_short(data)}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{prefix}.{unknown[0][:SHOWN]}: unknown field; allowed: {', '.join(sorted(allowed))}")
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
        raise RecipeError(f"{prefix}.name: unknown method {_short(name)}; registered: {', '.join(METHODS.names())}")
    fields = {k: v for k, v in entry.items() if k != "name"}
    return _validate(METHODS.get(name), fields, prefix)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (``methods.0.w_bits=4``); values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value, e.g. methods.0.w_bits=4")
        parts, node = key.split("."), data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {key[:SHOWN]}: {'.'.join(parts[:depth])} is the value {_short(node)}, "
                                  "not a mapping or a list")  # fmt: skip
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {key}: {'.'.join(parts[:depth])} has no item {part}")
                index: int | str = int(part)
            else:
                index = part
            if last:
                node[index] = parse_yaml(raw, f"override {key}")
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[index]
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe; returns the recipe and the resolved raw mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    raw = parse_yaml(path.read_text(errors="replace"), f"recipe {path}")
    raw = {} if raw is None else raw  # an empty file: parse_recipe names what is missing
    return parse_recipe(apply_overrides(raw, overrides or [])), raw


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with the limits a recipe needs: at most ``MAX_RECIPE_VALUES`` values once aliases
    are expanded (checked before anything walks the expanded data)."""
    with contextlib.suppress(yaml.YAMLError):  # the full parse below names a syntax error
        check_depth(text, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{what}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise RecipeError(f"{what}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RecipeError(f"{what}: a value cannot be read ({str(exc).split(';')[0][:120]})") from None
    if count_values(data) > MAX_RECIPE_VALUES:
        raise RecipeError(f"{what}: more than {MAX_RECIPE_VALUES} values once YAML aliases are expanded")
    return data


def check_depth(text: str, what: str) -> None:
    """Refuse YAML nested more than ``MAX_RECIPE_DEPTH`` deep from the parser's events, before the (recursive)
    composer builds anything: a deeply nested file is refused at once instead of after a deep recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"{what}: nested more than {MAX_RECIPE_DEPTH} deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def is_causal_lm(path: str) -> bool:
    """Whether the Hugging Face directory ``path`` holds a causal (decoder) LM, from its config.json (a
    missing or unreadable config, or one without ``architectures``, is a one-line error)."""
    from bitsmith.zoo.hf_directory import ModelDirectoryError
    from bitsmith.zoo.hf_directory import is_causal_lm as names_causal_lm

    try:  # model.path's validator has checked that config.json is there
        return names_causal_lm(Path(path))
    except (ModelDirectoryError, OSError) as exc:
        raise RecipeError(f"model.path: {exc}") from None


def task_data(name: str | None, path: str | None) -> str:
    """The data a model is evaluated on: fashion-mnist (zoo classifiers, the DDPM), austen (decoder LLMs), docstrings."""
    if name in ZOO or name == GENERATIVE:
        return "fashion-mnist"
    if name in LLM_MODELS or (path is not None and is_causal_lm(path)):
        return "austen"
    return "docstrings"


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
    known = [*ZOO, GENERATIVE, *HF_MODELS, *LLM_MODELS]
    if recipe.model.name is not None and recipe.model.name not in known:
        raise RecipeError(
            f"model.name: unknown model {recipe.model.name!r}; zoo models: {', '.join(known)} (or give 'path')"
        )
    expected = task_data(recipe.model.name, recipe.model.path)
    if recipe.data.name not in (None, expected):
        raise RecipeError(f"data.name: {recipe.model.name or recipe.model.path} is evaluated on {expected!r} "
                          f"(got {recipe.data.name!r})")  # fmt: skip
    recipe.data.name = expected
    check_structure(recipe)
    if recipe.export.gguf and recipe.model.name != "smollm2":
        raise RecipeError("export.gguf: a GGUF file takes its architecture and tokenizer from the zoo LLM's GGUF "
                          "(llama architecture: smollm2); remove it for this model")  # fmt: skip
    bad = [c for c in recipe.eval.critical_classes or [] if not 0 <= c < 10]
    if expected != "fashion-mnist" and recipe.eval.critical_classes:
        raise RecipeError("eval.critical_classes: only classification tasks have classes (remove it for HF models)")
    if bad:
        raise RecipeError(f"eval.critical_classes: {bad} are not Fashion-MNIST classes (0..9)")
    if expected != "fashion-mnist" and recipe.train is not None:
        raise RecipeError("train: training needs a labelled classification task; HF models are post-training only")
    if recipe.attack is not None:
        if expected != "fashion-mnist":
            raise RecipeError("attack: robust evaluation attacks image classifiers (zoo cnn / vit); remove it here")
        try:
            recipe.attack.specs()
        except ValueError as err:
            raise RecipeError(str(err)) from None
    check_generation(recipe)
    recipe.build_methods()
    recipe.train_config()
    return recipe
