"""How well would each draft serve GCG's probe sampling on a model? (``--draft``)

Probe sampling pays off when a draft is much cheaper than the model and ranks a step's
candidates as the model does. For each draft this runs the suite's GCG with probe sampling
and ``probe_factor=1`` (every candidate is also scored on the model, so the rank agreement
is measured over the whole step, not a probe set), and prints per draft the Spearman
agreement of each step, its mean, and the seconds the draft's scoring takes against the
model's (both scoring every candidate exactly, in one run, side by side).

    python benchmarks/bench_probe_agreement.py --drafts layers:4,layers:12,layers:24,smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--drafts", default="layers:4,layers:8,layers:12,layers:16,layers:20,layers:24,smollm2-135m",
                    help="comma-separated drafts: layers:N or a model with the model's tokenizer")
    ap.add_argument("--prompts", type=int, default=2, help="shipped harmful val instructions, the first N")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--search-width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    args = ap.parse_args()
    if args.prompts < 1 or args.steps < 1 or args.search_width < 2:
        sys.exit("bench_probe_agreement: --prompts and --steps must be at least 1, --search-width at least 2")

    import torch

    from suffix_analysis.attacks.gcg import GCG, GCGConfig
    from suffix_analysis.attacks.gcg.probe import ProbeSampler
    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.errors import UserError
    from suffix_analysis.models.loading import load_model

    cm = load_model(args.model, device="cpu", dtype="float32", progress=False)
    instr = [x.instruction for x in load_instructions("harmful:val")][: args.prompts]
    seconds = {"draft": 0.0, "model": 0.0}
    real_score = ProbeSampler.score

    def timed(self, scorer, prompts, cands, current, fulls, step):
        # the draft's pass, then the model's over the same candidates (probe_factor 1: all of them)
        t0 = time.perf_counter()
        self.draft_scorer.score([self.prompts[id(p)] for p in prompts], cands, current)
        t1 = time.perf_counter()
        self.exact.score(prompts, cands, current, fulls)
        seconds["draft"] += t1 - t0
        seconds["model"] += time.perf_counter() - t1
        return real_score(self, scorer, prompts, cands, current, fulls, step)

    ProbeSampler.score = timed
    print(f"model {args.model} ({cm.n_layers} layers), float32, {torch.get_num_threads()} threads; {len(instr)} "
          f"harmful val prompts x {args.steps} steps, width {args.search_width}, top-k {args.topk}; target "
          "'Sure, here is'", flush=True)
    for draft in args.drafts.split(","):
        seconds.update(draft=0.0, model=0.0)
        agree = []
        for i in instr:
            cfg = GCGConfig(num_steps=args.steps, search_width=args.search_width, topk=args.topk, suffix_len=20,
                            early_stop=False, draft=draft, probe_factor=1, checkpoint_every=0)
            try:
                r = GCG(cfg).run(cm, [i], ["Sure, here is"])
            except UserError as e:
                sys.exit(f"bench_probe_agreement: {e}")
            agree += r.extra["probe_agreement"]
        print(f"{draft:16s} agreement mean {statistics.mean(agree):+.2f}  (steps: "
              f"{' '.join(f'{a:+.2f}' for a in agree)})  draft/model scoring time "
              f"{seconds['draft'] / seconds['model']:.2f}", flush=True)


if __name__ == "__main__":
    main()
