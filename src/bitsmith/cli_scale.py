"""The command-line commands that go beyond one process: ``run --nproc`` (torchrun), ``sweep`` and ``tune`` (Ray)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from bitsmith.terminal import console, errors


def launch_torchrun(args: argparse.Namespace) -> int:
    """``bitsmith run --nproc N``: the same command under ``torchrun`` (N gloo processes on this machine)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "bitsmith", *(["--debug"] if args.debug else []), "run", args.recipe, "--out", args.out,
               *(["--smoke"] if args.smoke else []), *(["--restart"] if args.restart else []), *args.overrides]  # fmt: skip
    log = logging.getLogger("bitsmith")
    log.info(f"training in {args.nproc} processes: {' '.join(command[1:])}")
    return subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ).returncode


def cmd_sweep(args: argparse.Namespace) -> int:
    from bitsmith.recipe import RecipeError
    from bitsmith.sweep import parse_grid, run_sweep

    grid = parse_grid(args.grid)
    fixed = args.overrides  # each one checked with the recipe (key=value) before anything runs
    overlap = sorted({item.partition("=")[0] for item in fixed} & set(grid))
    if overlap:
        raise RecipeError(f"{', '.join(overlap)}: both swept (--grid) and fixed; give it once")
    sweep = run_sweep(Path(args.recipe), grid, Path(args.out), smoke=args.smoke, address=args.address, fixed=fixed)
    console.print(f"sweep: {len(sweep.ran)} ran, {len(sweep.skipped)} already finished, {len(sweep.failed)} failed; "
                  f"report: {Path(args.out) / 'sweep.md'}", highlight=False)  # fmt: skip
    for name, error in sweep.failed.items():
        errors.print(f"[bold red]failed:[/] {escape(name)}: {escape(error)}", highlight=False)
    return 1 if sweep.failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from bitsmith.tune import tune

    state = tune(Path(args.recipe), Path(args.out), args.max_drop, args.overrides, args.sensitivity, args.smoke,
                 args.parallel, args.address)  # fmt: skip
    best = state.best
    if best is None:
        raise ValueError("tune: no trial ran to the end; see the trial folders under --out")
    what = "reached" if state.reached else "not reached (best found kept)"
    console.print(f"tune {what}: {best.k} layer(s) at 8 bits, {state.metric} {best.quality:.2f} (FP32 "
                  f"{state.baseline:.2f}), {len(state.trials)} trial(s); best model: {Path(args.out) / 'best'}; "
                  f"report: {Path(args.out) / 'tune.md'}", highlight=False)  # fmt: skip
    return 0 if state.reached else 1


def add_scale_commands(sub: Any) -> None:
    """The ``sweep`` and ``tune`` subcommands."""
    from bitsmith.cli_args import positive_int

    sweep = sub.add_parser("sweep", help="run every combination of a grid of overrides on Ray, compare them")
    sweep.add_argument("recipe")
    sweep.add_argument("--grid", nargs="+", action="extend", required=True, metavar="FIELD=V1,V2",
                       help="fields and their values, e.g. methods.0.w_bits=2,3,4 methods.0.alpha=0.5,1")  # fmt: skip
    sweep.add_argument("--out", required=True, help="output directory (one run folder per combination under runs/)")
    sweep.add_argument("--address", help="join this Ray cluster (host:port, or auto); default: a local Ray")
    sweep.add_argument("--smoke", action="store_true", help="tiny subsets, for tests")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides applied to every run, e.g. export.deploy=none")
    sweep.set_defaults(func=cmd_sweep)

    tune = sub.add_parser("tune", help="raise the most sensitive layers to 8 bits until within --max-drop of FP32")
    tune.add_argument("recipe")
    tune.add_argument("--max-drop", type=float, required=True, help="allowed drop (top-1 points, or perplexity)")
    tune.add_argument("--out", required=True, help="output directory (trials/, best/, tune.md)")
    tune.add_argument("--sensitivity", default="loss", help="layer ranking: loss (default), hessian, fisher, error")
    tune.add_argument("--parallel", type=positive_int, default=1, help="trials per round, on Ray when > 1")
    tune.add_argument("--address", help="with --parallel: join this Ray cluster; default: a local Ray")
    tune.add_argument("--smoke", action="store_true", help="tiny subsets, for tests")
    tune.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. methods.0.w_bits=4")
    tune.set_defaults(func=cmd_tune)
