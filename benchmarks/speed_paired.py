"""Paired timing: bitsmith's deployed W8A8 against the peer on the same backend, the runs interleaved.

``speed.py`` times each path after the previous one, minutes apart, and on this kind of machine a path's latency
drifts by up to about 20% over minutes, more than some of the differences it compares. Here the paths of one
backend are built first and then timed in turns: ``ROUNDS`` rounds, each running every path ``PER_ROUND`` times
(mean per forward), so drift hits them alike; each round runs the paths in a new random order (seeded), so no path
always runs right after FP32 eager, whose float working set evicts the others' from the caches. A comparison is the
median over rounds of the ratio within the round (paired), not a ratio of medians: the latencies here are often
bimodal. ONNX Runtime and torch paths are timed in separate groups (ONNX Runtime's threads keep spinning after a
run and slow whatever runs next; within the ONNX Runtime group each path waits ``SETTLE_S`` before its turn, so the
previous session's threads have stopped spinning). Groups: torch (FP32 eager, bitsmith W8A8 -> torchao, torchao's
PT2E flow) and ONNX Runtime (bitsmith W8A8 -> ONNX Runtime, ONNX Runtime's ``quantize_static``), with the bitsmith
settings of ``speed.py`` (the CNN with PTQ's ``residual_adds``: ``shortcut`` on torchao, ``both`` and
``pool_inputs`` on ONNX Runtime). Each group also times the peer built a second time (*A/A control*): its ratio to the first build is what
two equal graphs differ by here, the noise floor of every other ratio in the group.

Regenerate: ``python benchmarks/speed_paired.py [minilm cnn vit]`` on an otherwise idle machine (rows resume per
model and group in ``speed-paired.json``); writes ``docs/results/speed-paired.md``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from typing import Any

import torch
from common import RESULTS, Rows, load
from speed import (
    BATCH,
    CONTROL,
    SCRATCH,
    THREADS,
    bitsmith_model,
    latency_example,
    machine,
    machine_line,
    ort_static,
    torchao_pt2e,
)

from bitsmith.deploy import deploy
from bitsmith.files import atomic_write_text

ROUNDS, PER_ROUND = 20, 3
SETTLE_S = 0.2  # idle time before each ONNX Runtime path's turn
RESIDUAL = {"torchao": "shortcut", "onnxruntime": "both"}  # the CNN's residual adds, per backend
NORM_FED = "bitsmith W8A8, SmoothQuant norm-fed -> torchao PT2E"
OUTLIERS = "bitsmith W8A8, SmoothQuant outliers (fc2 scaled where max/median >= 8) -> torchao PT2E"


def interleaved(runners: dict[str, Any], example: Any, settle: float = 0.0) -> dict[str, list[float]]:
    """Milliseconds per forward of each runner in each round; every runner runs once per round, in turn."""
    call = (lambda m: m(**example)) if isinstance(example, dict) else (lambda m: m(example))
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for runner in runners.values():  # warm-up
            call(runner), call(runner)
        order = random.Random(0)
        for _ in range(ROUNDS):  # a new order each round: no path always runs right after the same one
            for name in order.sample(list(runners), len(runners)):
                runner = runners[name]
                time.sleep(settle)  # the previous path's spinning threads (ONNX Runtime's) go to sleep first
                start = time.perf_counter()
                for _ in range(PER_ROUND):
                    call(runner)
                times[name].append((time.perf_counter() - start) / PER_ROUND * 1000)
    return times


def ours(name: str, base: Any, task: Any, example: Any, backend: str, smooth_layers: str = "all") -> Any:
    model = bitsmith_model(name, base, task, RESIDUAL[backend] if name == "cnn" else "none", smooth_layers)
    return deploy(model, example, backend, SCRATCH / f"paired-{backend}-{smooth_layers}", num_threads=THREADS).model


def torch_runners(name: str, base: Any, task: Any, example: Any) -> dict[str, Any]:
    """FP32 eager, bitsmith on torchao (MiniLM also with SmoothQuant's ``norm-fed`` layers and with ``outliers``:
    fc2's run-time scale only where its input has an outlier channel) and the peer's flow."""
    runners = {"FP32 torch eager": base, "bitsmith W8A8 -> torchao PT2E": ours(name, base, task, example, "torchao")}
    if name == "minilm":
        for label, layers in ((NORM_FED, "norm-fed"), (OUTLIERS, "outliers")):
            runners[label] = ours(name, base, task, example, "torchao", layers)
    peer = "torchao PT2E X86Inductor (static)"
    return {**runners, peer: torchao_pt2e(base, task, name, example),
            peer + CONTROL: torchao_pt2e(base, task, name, example)}  # fmt: skip


def ort_runners(name: str, base: Any, task: Any, example: Any) -> dict[str, Any]:
    """bitsmith on ONNX Runtime, ONNX Runtime's static quantization and its second build."""
    peer = "ONNX Runtime static QDQ per-channel"
    return {"bitsmith W8A8 -> ONNX Runtime": ours(name, base, task, example, "onnxruntime"),
            peer: ort_static(base, task, example)[0], peer + CONTROL: ort_static(base, task, example)[0]}  # fmt: skip


def groups(name: str, base: Any, task: Any, example: Any) -> dict[str, Any]:
    """Per group, a function building its runners (built only when the group is measured)."""
    return {"torch": lambda: torch_runners(name, base, task, example),
            "onnxruntime": lambda: ort_runners(name, base, task, example)}  # fmt: skip


def run(models: list[str]) -> None:
    torch.set_num_threads(THREADS)
    rows = Rows(RESULTS / "speed-paired.json")
    here = machine()  # rows of another kind of CPU are kept (their own table) and measured again here
    for name in models:
        if all(rows.done(model=name, group=group, **here) for group in ("torch", "onnxruntime")):
            continue
        base, task = load(name)
        task.evaluate(base)
        example = latency_example(name, task)
        for group, build in groups(name, base, task, example).items():
            if rows.done(model=name, group=group, **here):
                continue
            runners = build()
            times = interleaved(runners, example, SETTLE_S if group == "onnxruntime" else 0.0)
            for path, rounds in times.items():  # quality after the timing: it is the same for every round
                rows.add({"model": name, "group": group, "path": path, "median_ms": statistics.median(rounds),
                          "rounds_ms": rounds, "quality": task.evaluate(runners[path]), **machine()})  # fmt: skip
                print(name, group, path, f"{statistics.median(rounds):.1f} ms", flush=True)
    write(rows.rows)


def paired(reference: dict[str, Any], row: dict[str, Any]) -> str:
    """The median over rounds of ``reference``'s time / ``row``'s time in the same round."""
    ratios = [a / b for a, b in zip(reference["rounds_ms"], row["rounds_ms"], strict=True)]
    return f"{statistics.median(ratios):.2f}x"


def quality(row: dict[str, Any]) -> str:
    """MiniLM: cosine of the embeddings to FP32; CNN / ViT: top-1 % on the 10,000 test images (rows before
    quality was recorded: blank)."""
    scores = row.get("quality") or {}
    if "cosine" in scores:
        return f"cosine {scores['cosine']:.4f}"
    return f"top-1 {100 * scores['accuracy']:.2f}" if "accuracy" in scores else ""


def machine_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table of one kind of CPU."""
    lines = [machine_line(rows), "", "| model | group | path | median ms | vs FP32 eager | vs the peer | spread of rounds ms "
             "| quality |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in BATCH:
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["group"] != "torch")  # torch first
        for r in mine:
            same = [p for p in mine if p["group"] == r["group"]]
            fp32 = next((p for p in same if p["path"] == "FP32 torch eager"), None)
            peer = next(p for p in same if not p["path"].startswith("bitsmith") and p is not fp32)
            path = f"**{r['path']}**" if r["path"].startswith("bitsmith") else r["path"]
            lines.append(f"| {name} | {r['group']} | {path} | {r['median_ms']:.1f} | "
                         f"{paired(fp32, r) if fp32 else '-'} | {paired(peer, r)} | "
                         f"{min(r['rounds_ms']):.1f} - {max(r['rounds_ms']):.1f} | {quality(r)} |")  # fmt: skip
    return lines


def write(rows: list[dict[str, Any]]) -> None:
    doc = (__doc__ or "").split("\n\n")
    lines = ["# Paired timing: bitsmith against the peer on the same backend (2 threads)", "",
             " ".join(doc[0:2]).replace("\n", " "), "", doc[2].replace("\n", " "), ""]  # fmt: skip
    kinds = sorted({(r.get("cpu", ""), r.get("vnni", True)) for r in rows}, key=lambda k: (not k[1], k[0]))
    for cpu, vnni in kinds:  # the machine with VNNI first
        lines += [*machine_table([r for r in rows if (r.get("cpu", ""), r.get("vnni", True)) == (cpu, vnni)]), ""]
    lines += ["*vs FP32 eager*, *vs the peer*: the median over rounds of (their time / this path's time) in the same",
              "round; above 1 is faster.", ""]  # fmt: skip
    atomic_write_text(RESULTS / "speed-paired.md", "\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-only"]:
        write(Rows(RESULTS / "speed-paired.json").rows)
    else:
        run(sys.argv[1:] or list(BATCH))
