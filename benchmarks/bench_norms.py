"""The norm-preserving edit against the plain one, side by side (issue 25): the same shares of
the same direction removed from every residual writer, plain (the paper's
``W - s r^ r^T W``) or keeping each attention and MLP output matrix's row norms (heretic's row
normalization, exact), scored on selection prompts (harmful:val, harmless:val) and held out
(the first ``--limit`` of harmful:test and harmless:test): the share of harmful prompts whose
first token still refuses (refusal score > 0) and the mean first-token KL on harmless ones.

    python benchmarks/bench_norms.py --direction DIM [--layers 16,17.2,19.7] [--shares 1,0.8]
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--direction", required=True, help="a difference-in-means direction run")
    ap.add_argument("--layers", default="", help="comma-separated (fractional) direction layers; default: the run's")
    ap.add_argument("--shares", default="1,0.8", help="comma-separated shares removed at every writer")
    ap.add_argument("--limit", type=int, default=60, help="held-out prompts per set")
    args = ap.parse_args()
    try:
        shares = [float(x) for x in args.shares.split(",")]
        layers = [float(x) for x in args.layers.split(",")] if args.layers else []
    except ValueError:
        sys.exit("bench_norms: --layers and --shares take comma-separated numbers")
    if args.limit < 1 or not shares or not all(0 < s <= 3 for s in shares):
        sys.exit("bench_norms: --limit must be at least 1 and every share in (0, 3]")

    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.directions.extract import layer_direction
    from suffix_analysis.directions.run import load_direction, load_layer_directions
    from suffix_analysis.edits.pareto import Scorer
    from suffix_analysis.errors import UserError
    from suffix_analysis.interventions.profile import Tent, WeightProfile
    from suffix_analysis.models.loading import load_model

    try:
        cm = load_model(args.model, device="cpu", dtype="float32", progress=False)
        _, info = load_direction(args.direction, cm)
        cands = load_layer_directions(args.direction, cm)
        if cands is None:
            raise UserError(f"{args.direction} has no per-layer candidates; give a `suffix-analysis direction` run")

        def texts(spec, n=None):
            return [x.instruction for x in load_instructions(spec)][:n]

        val = Scorer(cm, texts("harmful:val"), texts("harmless:val"))
        test = Scorer(cm, texts("harmful:test", args.limit), texts("harmless:test", args.limit))
    except UserError as e:
        sys.exit(f"bench_norms: {e}")
    print(f"{args.model}; selection: harmful:val, harmless:val; held out: first {args.limit} of harmful:test, "
          "harmless:test; refused = first-token refusal score > 0")
    print(f"{'layer':>6} {'share':>5} | {'plain: val refused, KL':>24} {'test refused, KL':>18} | "
          f"{'norms kept: val refused, KL':>28} {'test refused, KL':>18} | KL ratio (test)")
    for layer in layers or [float(info["layer"])]:
        r = layer_direction(cands, layer)
        for s in shares:
            profile = WeightProfile(attn=Tent(s, 0.0, s, 1e9), mlp=Tent(s, 0.0, s, 1e9), embed=s)
            cells = [(val(profile, r, keep), test(profile, r, keep)) for keep in (False, True)]
            text = " | ".join(f"{a['refused']:12.1%} {a['kl']:.4f} {b['refused']:12.1%} {b['kl']:.4f}" for a, b in cells)
            print(f"{layer:6.1f} {s:5.2f} | {text} | {cells[1][1]['kl'] / cells[0][1]['kl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
