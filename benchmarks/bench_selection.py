"""Candidate selection: our batched scoring against the naive loop, in one run.

Naive: for every candidate, plain padded forward passes with full logits over harmful val
(bypass), harmless val (KL, ablated) and harmless val (induce); clean logits once.
Ours (`score_candidates`): bypass and KL in one ablated pass, the shared chat prefix
computed once per pass, length-sorted batches, last-position unembedding only.

    python benchmarks/bench_selection.py [--model smollm2-135m-refusal] [--layers 30] [--positions 2]

Prints seconds for each, their ratio, and the largest score difference (must be < 1e-4).
"""

from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--positions", type=int, default=2, help="score the last P EOI positions")
    ap.add_argument("--layers", type=int, default=None, help="score the first L layers (default all)")
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from suffix_analysis.datasets import shipped
    from suffix_analysis.directions.extract import diff_in_means
    from suffix_analysis.directions.select import score_candidates, score_candidates_naive
    from suffix_analysis.models.loading import load_model

    torch.manual_seed(0)
    cm = load_model(args.model, device=args.device, dtype=args.dtype)
    harmful_val = [x.instruction for x in shipped("harmful", "val")][: args.n_val]
    harmless_val = [x.instruction for x in shipped("harmless", "val")][: args.n_val]
    positions = cm.chat.eoi_positions[-args.positions:]
    cands = diff_in_means(cm, [x.instruction for x in shipped("harmful", "train")][:64],
                          [x.instruction for x in shipped("harmless", "train")][:64], positions=positions)
    cands = cands[:, : args.layers or cm.n_layers].float()
    n = cands.shape[0] * cands.shape[1]
    print(f"model {args.model} on {cm.device} ({cm.dtype}), {n} candidates "
          f"({len(positions)} positions x {cands.shape[1]} layers), {len(harmful_val)}+{len(harmless_val)} val prompts")

    def timed(fn):
        if cm.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(cm, cands, harmful_val, harmless_val, positions=positions, batch_size=args.batch_size)
        if cm.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    fast, t_fast = timed(score_candidates)
    naive, t_naive = timed(score_candidates_naive)
    diff = max(abs(getattr(a, k) - getattr(b, k)) for a, b in zip(fast, naive) for k in ("bypass", "induce", "kl"))
    print(f"naive loop      {t_naive:8.2f} s   ({t_naive / n:.3f} s per candidate)")
    print(f"score_candidates{t_fast:8.2f} s   ({t_fast / n:.3f} s per candidate)")
    print(f"speed-up        {t_naive / t_fast:8.2f}x")
    print(f"max |score difference| {diff:.2e}  ({'OK' if diff < 1e-4 else 'MISMATCH'} at 1e-4)")


if __name__ == "__main__":
    main()
