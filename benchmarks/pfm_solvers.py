"""PFM solvers on the digits flow: held-out evaluator score and wall time versus function evaluations (NFE).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pfm_solvers.py [--quick] [--out runs/bench_pfm_solvers]

Fits one digits flow (as in `prefalign demo pfm`), then integrates the same reference samples with
euler / midpoint / rk4 at several step counts and with dopri5 at several tolerances. Writes `results.json`,
`report.md` and `score_vs_nfe.png`: how few fixed steps match dopri5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefalign.core.report import markdown_table, plot_lines, write_report
from prefalign.demos.pfm import flow_config
from prefalign.methods.pfm import PreferenceFlow, collect_pairs, integrate
from prefalign.worlds import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pfm_solvers"))
    args = parser.parse_args()
    world = digits.make_world(0)
    torch.manual_seed(0)
    labels = torch.arange(10).repeat(300 if args.quick else 1000)
    flow = PreferenceFlow(flow_config(0, 600 if args.quick else 3000, hidden=256))
    flow.fit(*collect_pairs(world.generator, world.judge, labels))
    test = torch.arange(10).repeat(100)
    reference = world.generator(test, seed=123)
    runs = [(m, s, None) for m in ("euler", "midpoint", "rk4") for s in (1, 2, 4, 8, 16)]
    runs += [("dopri5", 0, tol) for tol in (1e-3, 1e-5)]
    rows = [{"solver": "reference", "steps": 0, "nfe": 0, "score": float(world.score(reference, test).mean()),
             "wall_ms": 0.0}]  # fmt: skip
    with torch.no_grad():
        for method, steps, tol in runs:
            start = time.perf_counter()
            out, nfe = integrate(
                flow.field, reference, test, method, steps, rtol=tol or 1e-5, atol=tol or 1e-5
            )
            wall = time.perf_counter() - start
            name = f"dopri5 tol={tol:g}" if tol else method
            score = float(world.score(out.clamp(0, 1), test).mean())
            rows.append({"solver": name, "steps": steps, "nfe": nfe, "score": score, "wall_ms": 1000 * wall})
            print(f"{name:18s} steps={steps:3d} nfe={nfe:4d} score={score:.4f} wall={1000 * wall:8.1f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    series = {m: ([r["nfe"] for r in rows if r["solver"] == m], [r["score"] for r in rows if r["solver"] == m])
              for m in ("euler", "midpoint", "rk4")}  # fmt: skip
    for r in rows:
        if r["solver"].startswith("dopri5"):
            series[r["solver"]] = ([r["nfe"]], [r["score"]])
    plot_lines(
        args.out / "score_vs_nfe.png", series, "function evaluations (NFE)", "evaluator score", markers=True
    )
    write_report(args.out, "PFM solvers on the digits flow", [
        f"1000 reference samples (100 per class), one flow; CPU, torch threads = {torch.get_num_threads()}.",
        markdown_table(rows, ["solver", "steps", "nfe", "score", "wall_ms"], digits=4),
        "![score vs NFE](score_vs_nfe.png)",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
