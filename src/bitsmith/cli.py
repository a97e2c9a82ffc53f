"""The ``bitsmith`` command line: run, methods, zoo, train, eval, report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def cmd_run(args: argparse.Namespace) -> int:
    from bitsmith.eval.report import headline
    from bitsmith.recipe import load_recipe
    from bitsmith.run import run_recipe

    recipe, _ = load_recipe(args.recipe, args.overrides)
    resolved = recipe.model_dump(mode="json")
    report = run_recipe(recipe, resolved, Path(args.out), smoke=args.smoke)
    line = headline(report["baseline"]["metrics"], report["compressed"]["metrics"])
    console.print(f"[bold]{report['name']}[/]: {line}; report: {Path(args.out) / 'report.md'}", highlight=False)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from bitsmith.method import HOOKS, METHODS

    table = Table("method", "description", "hooks")
    for name, cls in METHODS.items():
        hooks = ", ".join(h for h in HOOKS if cls.uses(h))
        table.add_row(name, cls.description, hooks)
    console.print(table)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from bitsmith.zoo import DATASETS, HF_MODELS, ZOO, checkpoint_path

    table = Table("model", "description", "cached checkpoint")
    for name, entry in ZOO.items():
        path = checkpoint_path(name)
        table.add_row(name, entry.description, str(path) if path.is_file() else "(trains on first use)")
    for name, description in HF_MODELS.items():
        table.add_row(name, description, "(pretrained, local package)")
    console.print(table)
    datasets = Table("dataset", "description")
    for name, description in DATASETS.items():
        datasets.add_row(name, description)
    console.print(datasets)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bitsmith.zoo import checkpoint_path, get_zoo_model, train_zoo_model

    get_zoo_model(args.model)
    if args.if_missing and checkpoint_path(args.model).is_file():
        console.print(f"{args.model}: using the cached checkpoint {checkpoint_path(args.model)}")
        return 0
    _, info = train_zoo_model(args.model, args.data)
    console.print(
        f"{args.model}: test top-1 {100 * info['test_accuracy']:.2f}% after {info['train_seconds']} s "
        f"on {info['threads']} threads; saved {checkpoint_path(args.model)}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bitsmith.eval.cost import model_cost
    from bitsmith.eval.tasks import classification_task, embedding_task
    from bitsmith.export.checkpoint import load, read_metadata
    from bitsmith.zoo import ZOO

    meta = json.loads(read_metadata(args.checkpoint).get("meta", "{}"))
    name = args.model or meta.get("model")
    if name is None:
        raise ValueError(f"{args.checkpoint}: the checkpoint does not name its model; pass --model NAME")
    seed = meta.get("recipe", {}).get("data", {}).get("seed", 0)
    if name in ZOO:
        model = load(args.checkpoint, ZOO[name].build())
        task = classification_task(args.data, None, 1, 1, seed)
    else:
        from bitsmith.zoo.minilm import load_hf_encoder

        model, tokenizer = load_hf_encoder(meta.get("source") if args.model is None else args.model)
        task = embedding_task(tokenizer, None, 1, 1, seed)
        task.evaluate(model)  # the FP32 model is the cosine reference
        model = load(args.checkpoint, model)
    metrics = task.evaluate(model.eval())
    cost = model_cost(model, task.first(task.example(1))).totals
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    console.print(
        f"{args.checkpoint}: model {name}, {scores} on {task.eval_examples} examples, "
        f"size {cost['size_bytes'] / 1024:.1f} KB, avg weight bits {cost['avg_weight_bits']:.2f}, "
        f"GBOPs {cost['bops'] / 1e9:.3f}",
        highlight=False,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bitsmith.eval.report import compare_runs

    out = Path(args.out) if args.out else None
    console.print(compare_runs([Path(d) for d in args.dirs], out), markup=False)
    if out is not None:
        console.print(f"written: {out / 'comparison.md'}, {out / 'accuracy_vs_size.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsmith", description="Compress and harden PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a YAML recipe and write a report")
    run.add_argument("recipe")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--smoke", action="store_true", help="tiny subsets, for tests")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. methods.0.w_bits=4")
    run.set_defaults(func=cmd_run)

    sub.add_parser("methods", help="list registered methods").set_defaults(func=cmd_methods)
    sub.add_parser("zoo", help="list zoo models and datasets").set_defaults(func=cmd_zoo)

    train = sub.add_parser("train", help="train (and cache) a zoo model")
    train.add_argument("model")
    train.add_argument("--data", help="Fashion-MNIST directory")
    train.add_argument("--if-missing", action="store_true", help="do nothing when a cached checkpoint exists")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--model", help="zoo model name or HF directory (default: from the checkpoint)")
    evaluate.add_argument("--data", help="Fashion-MNIST directory")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="compare run directories")
    report.add_argument("dirs", nargs="+")
    report.add_argument("--out", help="write comparison.md and a plot here")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any("=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # RecipeError, CheckpointError are ValueErrors
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
