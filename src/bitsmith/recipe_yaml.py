"""A recipe's text, read safely: bounded size, nesting and alias expansion, YAML without Python tags, and dotted
``key=value`` overrides. What the fields mean and which values they take is ``bitsmith.recipe``'s."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the field path, the value and what is allowed."""


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few hundred bytes; anything near this is not one
MAX_RECIPE_VALUES = 100_000  # values after YAML alias expansion (an alias bomb expands exponentially)
MAX_RECIPE_DEPTH = 64  # nested mappings / lists; a recipe nests three or four deep
SHOWN = 80  # characters of a bad value quoted in an error


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN`` characters (with the full length) for an error message."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


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


SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"  # inside the package: `bitsmith run NAME`


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes that ship with bitsmith (``bitsmith recipes`` lists them)."""
    return {path.stem: path for path in sorted(SHIPPED_RECIPES.glob("*.yaml"))}


def find_recipe(given: str | Path) -> Path:
    """``given`` when it is a file, else the shipped recipe of that name (``cnn-ptq-w8a8``; a ``.yaml`` suffix
    allowed); one line naming both when neither exists."""
    path = Path(given)
    if path.is_file():
        return path
    shipped = shipped_recipes().get(path.name.removesuffix(".yaml")) if path.parent == Path(".") else None
    if shipped is not None:
        return shipped
    raise RecipeError(f"recipe {given}: no such file, and no shipped recipe of that name (`bitsmith recipes` lists "
                      "them)")  # fmt: skip


def read_recipe_file(path: Path) -> Any:
    """The parsed YAML of the recipe file ``path`` (``{}`` for an empty file: the schema names what is missing)."""
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    raw = parse_yaml(path.read_text(errors="replace"), f"recipe {path}")
    return {} if raw is None else raw


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
                raise RecipeError(f"override {key[:SHOWN]}: {'.'.join(parts[:depth])} is the value {short_repr(node)}, "
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
