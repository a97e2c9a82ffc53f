"""Recipe sweeps on Ray: every combination of a grid of overrides as one Ray task and one run folder,
finished runs skipped (resumable), and one comparison report with the accuracy-vs-size / BOPs Pareto front.

A local Ray is started on demand with as many CPUs as this machine has (one run per core at a time);
``address`` joins an existing cluster instead, whose CPUs then bound the concurrency.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsmith.eval.report import LOWER_IS_BETTER, quality, save_figure
from bitsmith.files import IncompleteRun, atomic_write_text, check_run, run_fingerprint_of, writable_folder
from bitsmith.progress import log
from bitsmith.recipe import RecipeError, load_recipe

RUNS = "runs"
MAX_RUNS = 1000  # combinations per sweep: more is a typo or a job for a search (`bitsmith tune`)


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["methods.0.w_bits=2,3,4", "train.lr=0.1,0.01"]`` -> ``{"methods.0.w_bits": ["2", "3", "4"], ...}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise RecipeError(f"--grid {item!r}: write FIELD=VALUE1,VALUE2 (e.g. methods.0.w_bits=2,3,4)")
        if key.strip() in grid:
            raise RecipeError(f"--grid {key.strip()}: given twice; list all its values once")
        grid[key.strip()] = choices
    if not grid:
        raise RecipeError("--grid: give at least one FIELD=VALUE1,VALUE2")
    return grid


def combinations(grid: dict[str, list[str]]) -> list[list[str]]:
    """Every combination as a list of ``field=value`` overrides (the grid's order, last field fastest); a grid of
    more than ``MAX_RUNS`` combinations is refused before any is built."""
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(values)) for values in grid.values())
        raise RecipeError(f"--grid: {count} combinations ({sizes}); a sweep runs at most {MAX_RUNS}: narrow the "
                          "grid, or split it into several sweeps into the same --out (finished runs are kept)")  # fmt: skip
    return [[f"{k}={v}" for k, v in zip(grid, values, strict=True)] for values in itertools.product(*grid.values())]


def run_name(overrides: list[str], varying: set[str] | None = None) -> str:
    """A folder name for one combination: ``w_bits=2,alpha=0.5`` (the last parts of the fields in ``varying``, by
    default all; file-safe)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        if varying is None or key in varying:
            parts.append(f"{key.split('.')[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:200] or "base"


def check_combinations(recipe: Path, runs: list[list[str]]) -> None:
    """Validate every combination before anything runs: a field the recipe does not have, or a value it does not
    accept, is one line naming it."""
    if len(runs) > 20:
        log.info(f"sweep: checking the {len(runs)} combinations against the recipe")
    for overrides in runs:
        try:
            parsed, _ = load_recipe(recipe, overrides)
            parsed.build_methods()
        except (RecipeError, ValueError) as exc:
            raise RecipeError(f"--grid {' '.join(overrides)}: {str(exc).splitlines()[0]}") from None


def finished(folder: Path, fingerprint: str | None = None) -> bool:
    """Whether ``folder`` holds a finished run, made by the run ``fingerprint`` names when one is given (another
    recipe, other overrides or --smoke made a different run: not finished, it is run again)."""
    try:
        check_run(folder)
    except (FileNotFoundError, IncompleteRun):
        return False
    return fingerprint is None or run_fingerprint_of(folder) == fingerprint


def fingerprint_of(recipe: str | Path, overrides: list[str], smoke: bool) -> str:
    """The fingerprint ``bitsmith run`` records for ``recipe`` with ``overrides`` (and ``--smoke``)."""
    from bitsmith.run import model_source, run_fingerprint

    parsed, _ = load_recipe(recipe, overrides)
    return run_fingerprint(parsed.model_dump(mode="json"), model_source(parsed), smoke)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` cluster address that does not answer is one line, not a minute of retries."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s) as connection:
            grpc = speaks_grpc(connection)
    except (OSError, ValueError):
        raise ConnectionError(
            f"--address {address}: no Ray cluster answers there (start one with `ray start --head`, check the "
            "address, or drop --address to start a local Ray)"
        ) from None
    if not grpc:
        raise ConnectionError(
            f"--address {address}: something listens there but it is not a Ray cluster (Ray's GCS speaks gRPC; "
            "this port did not); give the head node's GCS address (`ray start --head` prints it, port 6379 by "
            "default), or drop --address to start a local Ray"
        )


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS


def speaks_grpc(connection: socket.socket) -> bool:
    """Whether the server behind ``connection`` answers an HTTP/2 client preface with a SETTINGS frame (as every
    gRPC server, Ray's GCS among them, does); silence until the socket's timeout or anything else is no."""
    try:
        connection.sendall(HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except OSError:
        return False
    return header[3] == 4  # frame type SETTINGS


def run_one(recipe: str, overrides: list[str], out: str, smoke: bool) -> dict[str, Any]:
    """One run: the recipe with ``overrides`` into ``out``; its metrics or its error line."""
    from bitsmith.run import run_recipe

    try:
        parsed, _ = load_recipe(recipe, overrides)
        report = run_recipe(parsed, parsed.model_dump(mode="json"), Path(out), smoke=smoke, name=Path(out).name)
    except Exception as exc:  # one failed run is reported; the others go on
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"metrics": report["compressed"]["metrics"]}


def run_one_task(recipe: str, overrides: list[str], out: str, smoke: bool) -> dict[str, Any]:
    """``run_one`` as a Ray task of one CPU: one torch thread (Ray runs as many tasks as there are cores)."""
    import torch

    torch.set_num_threads(1)
    return run_one(recipe, overrides, out, smoke)


@dataclass
class Sweep:
    """What ``run_sweep`` did: each combination's folder, and the runs it ran, skipped or saw fail."""

    folders: dict[str, list[str]] = field(default_factory=dict)  # run folder name -> overrides
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_sweep(
    recipe: Path,
    grid: dict[str, list[str]],
    out: Path,
    smoke: bool = False,
    address: str | None = None,
    fixed: list[str] | None = None,
) -> Sweep:
    """Run every combination of ``grid`` (after the ``fixed`` overrides) on Ray into ``out/runs/NAME``, skipping
    finished ones, then write ``out/sweep.md`` and ``out/pareto.png``."""
    runs = combinations(grid)
    check_combinations(recipe, [[*(fixed or []), *o] for o in runs])
    writable_folder(out)
    varying = {key for key, values in grid.items() if len(values) > 1}  # a one-value field names no run
    sweep = Sweep(folders={run_name(o, varying): o for o in runs})
    pending = {}
    for name, overrides in sweep.folders.items():
        if finished(out / RUNS / name, fingerprint_of(recipe, [*(fixed or []), *overrides], smoke)):
            sweep.skipped.append(name)
        else:
            pending[name] = overrides
    log.info(f"sweep: {len(runs)} runs, {len(sweep.skipped)} already finished, {len(pending)} to run")
    if pending:
        tasks = {n: (str(recipe), [*(fixed or []), *o], str(out / RUNS / n), smoke) for n, o in pending.items()}
        results = run_on_ray(tasks, address)
        for name, result in results.items():
            if "error" in result:
                sweep.failed[name] = result["error"]
            else:
                sweep.ran.append(name)
    write_sweep_report(out, sweep)
    return sweep


def run_on_ray(tasks: dict[str, tuple[Any, ...]], address: str | None) -> dict[str, dict[str, Any]]:
    """Each task's ``run_one`` result, run as Ray tasks of one CPU each; logs a line as each finishes."""
    import ray

    if address:
        check_reachable(address)
    started_here = not ray.is_initialized()
    if started_here:
        options = {"address": address} if address else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        ray.init(**options, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_one_task)
        refs = {remote.remote(*args): name for name, args in tasks.items()}
        results: dict[str, dict[str, Any]] = {}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            name = refs[done[0]]
            results[name] = ray.get(done[0])
            state = results[name].get("error", "done")
            log.info(f"sweep: {len(results)}/{len(tasks)} {name}: {state}")
        return results
    finally:
        if started_here:
            ray.shutdown()


def pareto_front(points: list[tuple[str, float, float]], higher_is_better: bool = True) -> list[str]:
    """Names of the points no other point beats on both cost (lower) and quality: the frontier."""
    sign = 1 if higher_is_better else -1
    front, best = [], float("-inf")
    for name, _, value in sorted(points, key=lambda p: (p[1], -sign * p[2])):
        if sign * value > best:
            front.append(name)
            best = sign * value
    return front


def write_sweep_report(out: Path, sweep: Sweep) -> None:
    """``sweep.md`` (one row per combination, the frontier marked) and ``pareto.png`` (quality vs size and BOPs)."""
    rows = []
    for name, overrides in sweep.folders.items():
        folder = out / RUNS / name
        if finished(folder):
            metrics = check_run(folder)["compressed"]["metrics"]
            rows.append((name, overrides, metrics))
    label = quality(rows[0][2])[0] if rows else "quality"
    higher = label not in LOWER_IS_BETTER
    by_size = pareto_front([(n, m["size_bytes"], quality(m)[1]) for n, _, m in rows], higher)
    by_bops = pareto_front([(n, m.get("bops") or 0.0, quality(m)[1]) for n, _, m in rows], higher)
    lines = [
        "# Sweep",
        "",
        f"{len(sweep.folders)} runs ({len(rows)} finished); each run's report is under `{RUNS}/NAME/`. "
        "Frontier: no other run is both smaller (or has fewer BOPs) and better.",
        "",
        f"| run | overrides | {label} | size KB | GBOPs | frontier (size) | frontier (BOPs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, overrides, m in rows:
        lines.append(
            f"| {name} | `{' '.join(overrides)}` | {quality(m)[1]:.2f} | {m['size_bytes'] / 1024:.1f} | "
            f"{(m.get('bops') or 0) / 1e9:.3f} | {'yes' if name in by_size else ''} | {'yes' if name in by_bops else ''} |"
        )
    for name, error in sweep.failed.items():
        lines.append(f"| {name} | `{' '.join(sweep.folders[name])}` | failed: {error} | | | | |")
    if rows:
        plot_pareto(rows, by_size, by_bops, label, out / "pareto.png")
        lines += ["", "![Pareto front](pareto.png)"]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")


def plot_pareto(rows: list[tuple[str, list[str], dict[str, Any]]], by_size: list[str], by_bops: list[str],
                label: str, path: Path) -> Path:  # fmt: skip
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, scale, front, xlabel in ((axes[0], "size_bytes", 1024, by_size, "model size (KB)"),
                                          (axes[1], "bops", 1e9, by_bops, "GBOPs per example")):  # fmt: skip
        points = {name: ((m.get(key) or 0) / scale, quality(m)[1]) for name, _, m in rows}
        ax.scatter(*zip(*points.values(), strict=True), s=30, color="0.6", label="run")
        line = sorted(points[name] for name in front)
        ax.plot(*zip(*line, strict=True), "o-", color="C3", label="frontier")
        for name, (x, y) in points.items():
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{label} vs cost")
    fig.tight_layout()
    return save_figure(fig, path)
