"""LiftQuant's codebooks on their own: the mean squared error per dimension of i.i.d. N(0, 1) vectors coded at
2, 2.5 and 3 bits per weight with vectors of m = 4 (bitsmith's former default) and the official shapes with
m = 8 (16to8, 20to8, 24to8) or 6 (18to6), against the best scalar quantizer (Lloyd-Max) and the
rate-distortion bound 2^(-2R). Each codebook is trained by ``bitsmith.methods.llm.liftquant.trained_codebook``
(the cache the method uses) at the budget in its row; the error is measured on 20,000 vectors from a seed
training never draws; the encoder's time per vector is measured on one thread.

Writes docs/results/lift-codebooks.{json,md,png}; rows resume; ``--write-only`` rewrites the page;
``--only TEXT`` measures only the rows whose label contains TEXT; ``--retime`` times the encoder again for the rows
already measured (after a change to the search; MSE and training time are kept).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import RESULTS, Rows, bench_parser, save_figure

from bitsmith.deploy import int8_pairs_saturate
from bitsmith.eval.latency import load_averages
from bitsmith.methods.llm.liftquant import trained_codebook

ROWS = RESULTS / "lift-codebooks.json"
EVAL_VECTORS = 20_000
TIMED_VECTORS = 2_000
LLOYD_MAX = {2: 0.1175, 3: 0.03454}  # MSE of the best scalar quantizer of N(0, 1) (Max 1960)
SPEC = (3000, 5)  # the spec's training budget: steps x restarts (batch 500)

# (m, n, steps, restarts): the spec's budget where a CPU trains it in minutes; the large searches at less
SHAPES = [
    (4, 8, *SPEC), (4, 10, *SPEC), (4, 12, *SPEC),
    (8, 16, *SPEC), (8, 20, 1000, 1), (6, 18, 1000, 1), (8, 24, 100, 1),
    (8, 20, *SPEC), (6, 18, *SPEC),
]  # fmt: skip


def label(m: int, n: int, steps: int, restarts: int) -> str:
    return f"{n}to{m} ({n / m:.3g} b/w), {steps} steps x {restarts} restarts"


def encode_time(codebook: Any, z: torch.Tensor) -> dict[str, Any]:
    """Microseconds per vector of encoding ``TIMED_VECTORS`` of ``z`` on one thread, and the CPU it ran on."""
    torch.set_num_threads(1)
    began = time.perf_counter()
    codebook.encode(z[:TIMED_VECTORS])
    encode_us = (time.perf_counter() - began) / TIMED_VECTORS * 1e6
    return {"encode_us_per_vector": round(encode_us, 1), "threads": 1, "cpu": torch.backends.cpu.get_cpu_capability(),
            "vnni": not int8_pairs_saturate()}  # fmt: skip


def eval_vectors(m: int) -> torch.Tensor:
    return torch.randn(EVAL_VECTORS, m, generator=torch.Generator().manual_seed(12345))


def measure(m: int, n: int, steps: int, restarts: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    began = time.perf_counter()
    codebook = trained_codebook(m, n, steps, restarts, seed=0)
    train_seconds = time.perf_counter() - began  # 0-ish when the codebook was cached or shipped
    z = eval_vectors(m)
    return {"m": m, "n": n, "bits": n / m, "steps": steps, "restarts": restarts, "mse": codebook.mse(z),
            "train_seconds": round(train_seconds, 1), **encode_time(codebook, z)}  # fmt: skip


def retime(rows: Rows) -> None:
    """Time the encoder again for the measured rows (a faster search: the MSE and training time stay)."""
    for row in list(rows.rows):
        m, n, steps, restarts = (row[k] for k in ("m", "n", "steps", "restarts"))
        codebook = trained_codebook(m, n, steps, restarts, seed=0)  # cached: the row trained it
        updated = {**{k: v for k, v in row.items() if k != "load"}, **encode_time(codebook, eval_vectors(m))}
        rows.put({**updated, "load": load_averages()}, m=m, n=n, steps=steps, restarts=restarts)
        print(row["name"], f"{row['encode_us_per_vector']} -> {updated['encode_us_per_vector']} µs", flush=True)


def write_page(rows: list[dict[str, Any]]) -> None:
    lines = [
        "# LiftQuant codebooks on Gaussian data",
        "",
        "Regenerate: `python benchmarks/lift_codebooks.py` (rows resume; `--write-only` rewrites this page).",
        f"MSE per dimension of {EVAL_VECTORS:,} i.i.d. N(0, 1) vectors through encode / decode (the candidate search",
        "over all 2^(n-m) paddings plus the greedy bit flips); training: batch 500, Adam lr 0.02 with a cosine",
        "schedule, soft-min tau 10 over each vector's 64 nearest candidates, the restart with the least MSE kept;",
        "encode time per vector on one thread. References: Lloyd-Max (best scalar quantizer) 2 bits 0.1175, 3 bits",
        "0.03454; rate-distortion bound 2^(-2R).",
        "",
        "| codebook | bits/weight | m | training | MSE | vs Lloyd-Max | bound | train s | encode µs/vector | CPU | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["bits"], r["m"], r["steps"] * r["restarts"])):
        scalar = LLOYD_MAX.get(int(r["bits"])) if r["bits"] == int(r["bits"]) else None
        versus = f"{r['mse'] / scalar:.3f}x" if scalar else "-"
        lines.append(f"| {r['n']}to{r['m']} | {r['bits']:.3g} | {r['m']} | {r['steps']} x {r['restarts']} | "
                     f"{r['mse']:.5f} | {versus} | {2 ** (-2 * r['bits']):.5f} | {r['train_seconds']} | "
                     f"{r['encode_us_per_vector']} | {r['cpu']}{' VNNI' * r['vnni']} | {r.get('load', '-')} |")  # fmt: skip
    (RESULTS / "lift-codebooks.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["m"] for r in rows}):
        best: dict[float, float] = {}
        for r in rows:
            if r["m"] == m:
                best[r["bits"]] = min(best.get(r["bits"], float("inf")), r["mse"])
        xs = sorted(best)
        ax.plot(xs, [best[x] for x in xs], "o-", label=f"LiftQuant m = {m}")
    xs = [2.0, 2.5, 3.0]
    ax.plot(xs, [2 ** (-2 * x) for x in xs], "k:", label="rate-distortion bound")
    ax.plot(list(LLOYD_MAX), list(LLOYD_MAX.values()), "ks", label="Lloyd-Max (scalar)")
    ax.set(xlabel="bits per weight", ylabel="MSE per dimension, N(0, 1)", yscale="log")
    ax.legend()
    save_figure(fig, "lift-codebooks.png")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--retime", action="store_true", help="time the encoder again for the measured rows")
    args = parser.parse_args()
    rows = Rows(ROWS)
    if args.retime:
        retime(rows)
    elif not args.write_only:
        for m, n, steps, restarts in SHAPES:
            name = label(m, n, steps, restarts)
            if (args.only and args.only not in name) or rows.done(m=m, n=n, steps=steps, restarts=restarts):
                continue
            print(name, "...", flush=True)
            row = measure(m, n, steps, restarts)
            rows.add({"name": name, **row})
            print(f"  MSE {row['mse']:.5f}, {row['train_seconds']} s training", flush=True)
    write_page(rows.rows)


if __name__ == "__main__":
    main()
