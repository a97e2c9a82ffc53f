"""Accuracy-aware tuning (what INC's and NNCF's users rely on): start from a recipe's quantization and raise the
most sensitive layers to 8 bits until the quality is within ``max_drop`` of FP32.

The layers are ranked once by the sensitivities the ``mixed`` method computes (default ``loss``: the measured
increase of the calibration loss when only that layer's weight and input are quantized at the recipe's
widths; or ``hessian`` / ``fisher`` / ``error``). Trial ``k`` keeps the ``k`` most sensitive layers at W8 (A8);
trial 0 is the recipe itself and trial ``L`` has every layer at 8 bits. If trial ``L`` misses the target the
tuner stops and says so; otherwise it bisects ``k`` (``parallel`` trials per round, on Ray when ``parallel``
> 1), assuming fewer 8-bit layers never help: the result is the fewest it finds along the ranking, not a
search over every subset. Each trial is a plain run folder (its recipe with the layers' overrides, report and
checkpoint), the best is copied to ``best/``: the passing trial with the fewest 8-bit layers, else the one
closest to the target.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bitsmith.data import concat_batches
from bitsmith.eval.report import LOWER_IS_BETTER, quality
from bitsmith.files import atomic_write_text, check_run, writable_folder
from bitsmith.method import build_method
from bitsmith.methods.ptq.ptq import PTQ
from bitsmith.progress import log
from bitsmith.recipe import Recipe, RecipeError, load_recipe
from bitsmith.sweep import fingerprint_of, finished, run_on_ray, run_one

SENSITIVITIES = ("loss", "hessian", "fisher", "error")


@dataclass
class Trial:
    """One tried configuration: the ``k`` most sensitive layers at 8 bits."""

    k: int
    layers: list[str]
    folder: str
    quality: float | None = None
    drop: float | None = None
    size_kb: float | None = None
    passed: bool = False
    error: str | None = None


@dataclass
class Tuning:
    metric: str
    baseline: float
    max_drop: float
    ranking: list[tuple[str, float]]
    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    reached: bool = False


def quantizer_of(recipe: Recipe) -> PTQ:
    methods = recipe.build_methods()
    if not methods or not isinstance(methods[0], PTQ):
        name = methods[0].registered_name if methods else "nothing"
        raise RecipeError(f"tune raises layers of a ptq-style first method (ptq, mixed); methods.0 is {name}")
    return methods[0]


def rank_layers(recipe: Recipe, ptq: PTQ, sensitivity: str, smoke: bool) -> list[tuple[str, float]]:
    """``ptq``'s layers (the recipe's first method), most sensitive first, with the sensitivity at its widths."""
    from bitsmith.run import load_task

    model, task = load_task(recipe, smoke)
    config = {k: v for k, v in ptq.config().items() if k != "name"}
    mixed = build_method({**config, "name": "mixed", "sensitivity": sensitivity, "candidates": [ptq.w_bits or 8],
                          "a_candidates": [ptq.a_bits] if ptq.a_bits else None, "avg_bits": 16.0})  # fmt: skip
    mixed.prepare(model)
    batch = concat_batches(list(task.calibration))
    with torch.enable_grad():
        weight_cost, input_cost = mixed.perturbations(model, batch)
    scores = {name: sum(weight_cost[name].values()) + sum(input_cost[name].values()) for name in weight_cost}
    return sorted(scores.items(), key=lambda item: -item[1])


def trial_overrides(ptq: PTQ, layers: list[str]) -> list[str]:
    """The overrides of the recipe's first method ``ptq`` that put ``layers`` at 8-bit weights (and inputs, when it
    quantizes them), kept with its own per-layer overrides."""
    where = ptq.config()["where"]
    own = where.get("overrides", {})
    raised = {"w_bits": 8, **({"a_bits": 8} if ptq.a_bits else {})}
    overrides = {**own, **{name: {**own.get(name, {}), **raised} for name in layers}}
    return [f"methods.0.where={json.dumps({**where, 'overrides': overrides})}"]


def tune(
    recipe_path: Path,
    out: Path,
    max_drop: float,
    fixed: list[str] | None = None,
    sensitivity: str = "loss",
    smoke: bool = False,
    parallel: int = 1,
    address: str | None = None,
) -> Tuning:
    """Search the fewest 8-bit layers that bring the quality within ``max_drop`` of FP32 (see the module)."""
    if sensitivity not in SENSITIVITIES:
        raise RecipeError(f"--sensitivity {sensitivity}: choose one of {', '.join(SENSITIVITIES)}")
    if not math.isfinite(max_drop) or max_drop < 0:
        raise RecipeError(f"--max-drop {max_drop}: the allowed drop is a finite number >= 0 (points of top-1, or of "
                          "perplexity)")  # fmt: skip
    fixed = fixed or []
    recipe, _ = load_recipe(recipe_path, fixed)
    ptq = quantizer_of(recipe)
    writable_folder(out)
    log.info(f"tune: ranking the layers by {sensitivity} sensitivity at the recipe's widths")
    ranking = rank_layers(recipe, ptq, sensitivity, smoke)
    order = [name for name, _ in ranking]
    state = Tuning(metric="", baseline=0.0, max_drop=max_drop, ranking=ranking)

    def run(ks: list[int]) -> None:
        trials = [Trial(k, order[:k], str(out / "trials" / f"k{k:03d}")) for k in ks]
        arguments = {t.folder: (str(recipe_path), [*fixed, *trial_overrides(ptq, t.layers)], t.folder, smoke)
                     for t in trials}  # fmt: skip
        tasks = {folder: args for folder, args in arguments.items()  # a trial folder another run made is redone
                 if not finished(Path(folder), fingerprint_of(args[0], args[1], smoke))}  # fmt: skip
        if parallel > 1 and len(tasks) > 1:
            results = run_on_ray(tasks, address)
        else:
            results = {folder: run_one(*args) for folder, args in tasks.items()}
        for trial in trials:
            error = results.get(trial.folder, {}).get("error")
            if error:
                trial.error = error
            else:
                score(trial, state)
            state.trials.append(trial)
            log.info(f"tune: {trial.k} layer(s) at 8 bits: " + (f"failed: {error}" if error else
                     f"{state.metric} {trial.quality:.2f} (drop {trial.drop:.2f}, {'within' if trial.passed else 'over'} {max_drop})"))  # fmt: skip

    run([0])
    if not state.trials[0].passed and order:
        run([len(order)])
        if state.trials[-1].passed:
            low, high = 0, len(order)  # low misses, high passes
            while high - low > 1:
                step = max(1, (high - low) // (parallel + 1))
                ks = list(range(low + step, high, step))[:parallel] or [(low + high) // 2]
                run(ks)
                passed = {t.k: t.passed for t in state.trials if t.error is None}
                new_high = min([k for k in ks if passed.get(k)] + [high])
                new_low = max([k for k in ks if k < new_high and passed.get(k) is False] + [low])
                if (new_low, new_high) == (low, high):  # every trial of the round failed to run
                    break
                low, high = new_low, new_high
    finish(state, out)
    return state


def score(trial: Trial, state: Tuning) -> None:
    report = check_run(Path(trial.folder))
    label, base = quality(report["baseline"]["metrics"])
    _, value = quality(report["compressed"]["metrics"])
    drop = value - base if label in LOWER_IS_BETTER else base - value
    state.metric, state.baseline = label, base
    trial.quality, trial.drop = value, drop
    trial.size_kb = report["compressed"]["metrics"]["size_bytes"] / 1024
    trial.passed = drop <= state.max_drop


def finish(state: Tuning, out: Path) -> None:
    """Pick and copy the best trial, write ``tune.json`` and ``tune.md``."""
    scored = [t for t in state.trials if t.error is None]
    passing = [t for t in scored if t.passed]
    state.reached = bool(passing)
    if passing:
        state.best = min(passing, key=lambda t: (t.k, t.drop))
    elif scored:
        state.best = min(scored, key=lambda t: (t.drop, t.k))
    if state.best is not None:
        best = out / "best"
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(state.best.folder, best)
    atomic_write_text(out / "tune.json", json.dumps(asdict(state), indent=2))
    atomic_write_text(out / "tune.md", tune_markdown(state))


def tune_markdown(state: Tuning) -> str:
    verdict = (
        f"reached: {state.best.k} layer(s) at 8 bits keep the drop at {state.best.drop:.2f} <= {state.max_drop}"
        if state.reached and state.best
        else f"not reached: even every layer at 8 bits misses the allowed drop of {state.max_drop}; best found kept"
    )
    lines = [
        "# Accuracy-aware tuning",
        "",
        f"FP32 {state.metric} {state.baseline:.2f}; allowed drop {state.max_drop}. **{verdict}** (saved in `best/`).",
        "",
        "| trial | layers at 8 bits | quality | drop | size KB | within |",
        "|---|---|---|---|---|---|",
    ]
    for t in sorted(state.trials, key=lambda t: t.k):
        if t.error:
            lines.append(f"| k{t.k:03d} | {t.k} | failed: {t.error} | | | |")
        else:
            lines.append(f"| k{t.k:03d} | {t.k} | {t.quality:.2f} | {t.drop:.2f} | {t.size_kb:.1f} | "
                         f"{'yes' if t.passed else 'no'} |")  # fmt: skip
    lines += ["", "Layers by sensitivity (most sensitive first):", ""]
    lines += [f"{i + 1}. `{name}` ({value:.4g})" for i, (name, value) in enumerate(state.ranking)]
    return "\n".join(lines) + "\n"
