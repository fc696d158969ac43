"""Refusal against cone dimension: learn a refusal cone of each dimension with RDO and check
each on held-out prompts (issue 25's figure).

For every k in ``--dims``, ``suffix-analysis rdo --cone-dim k`` from the direction run, into
``OUT/k{k}`` (resumable: a finished k is not trained again); k = 1 is RDO's single direction,
checked the same way. Each cone is scored by ``directions.rdo.check_cone`` on the first 60
prompts of harmful:test and harmless:test (refusal score > 0 at the first token): its basis
vectors and ``--samples`` random unit vectors of the cone, ablated and added, and the whole
span ablated. Writes ``OUT/cones.csv`` and draws ``OUT/cones.png`` from it.

    python benchmarks/bench_cones.py --direction DIM --dims 1,2,3,4,5 --out CONES [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--direction", required=True, help="the difference-in-means direction run RDO starts from")
    ap.add_argument("--dims", default="1,2,3,4,5")
    ap.add_argument("--steps", type=int, default=60, help="RDO steps per cone (the CPU profile's)")
    ap.add_argument("--samples", type=int, default=8, help="random cone vectors checked per cone")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        dims = [int(x) for x in args.dims.split(",")]
    except ValueError:
        sys.exit(f"bench_cones: --dims takes comma-separated integers, got {args.dims!r}")
    if not dims or not all(1 <= k <= 5 for k in dims) or args.steps < 1 or args.samples < 1:
        sys.exit("bench_cones: every dimension must be 1..5, --steps and --samples at least 1")

    import pandas as pd
    from safetensors.torch import load_file

    from suffix_analysis.config import for_profile
    from suffix_analysis.directions.rdo import RDOConfig, check_cone, run_rdo
    from suffix_analysis.errors import UserError
    from suffix_analysis.figures.cones import draw_cones
    from suffix_analysis.models.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cm = load_model(args.model, device="cpu", dtype="float32", progress=False)
        rows = []
        for k in dims:
            t0 = time.perf_counter()
            cfg = for_profile(RDOConfig, "cpu", steps=args.steps, cone_dim=k, cone_samples=args.samples)
            info = run_rdo(cm, args.direction, out / f"k{k}", cfg, progress=True)
            if k == 1:
                d = load_file(str(out / "k1" / "direction.safetensors"))["direction"]
                basis = (d / d.norm())[None]  # a 1-dimensional cone: the direction itself
                check = check_cone(cm, basis, info["norm"], info["layer"], cfg)
            else:
                check = json.loads((out / f"k{k}" / "cone.json").read_text())
            for r in check["vectors"]:
                rows.append({"cone_dim": k, **{c: r.get(c) for c in ("vector", "refusing_ablated", "refusing_added",
                                                                       "kl", "bypass", "induce")}})
            print(f"k={k}: {time.perf_counter() - t0:.0f} s; " + "; ".join(
                f"{r['vector']}: {1 - r['refusing_ablated']:.0%} bypassed"
                + (f", {r['refusing_added']:.0%} induced" if r.get("refusing_added") is not None else "")
                for r in check["vectors"]), flush=True)
    except UserError as e:
        sys.exit(f"bench_cones: {e}")
    table = out / "cones.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    print(f"saved {table} and {draw_cones(table)}")


if __name__ == "__main__":
    main()
