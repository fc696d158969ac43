"""Time to a working suffix: the suite's GCG (and variants of it) against nanoGCG, side by side.

For each of ``--prompts`` shipped harmful val instructions and each of ``--seeds`` seeds,
every engine starts from the same initial suffix ("x" x suffix_len) and the same target,
under the same step budget (``--max-steps``) and time budget (``--max-seconds``), with the
same width, top-k, dtype and CPU threads, and stops once the target is the greedy
continuation. Success is checked the same way for every engine, after the run, by the
suite's plain forward (``target_is_greedy``: the prompt with the returned suffix rendered
as text, tokenized whole, every target token the argmax). Time to success is the sum of
the engine's step seconds (model loading and set-up excluded for both).

Targets: the first ``--target-tokens`` tokens of the suite's AdvBench-style default target
("Sure, here is ..." + the rephrased instruction). With 4 tokens that is "Sure, here is"
(+ at most one word): the opening a refusal must give way to, the part that decides
whether the organism refuses; longer targets add steps for both engines alike.

Prints per run steps, seconds and success, then per engine the success rate within the
budget, the median time to success with its interquartile range (failures count as
above the budget), the ratio of medians against nanoGCG and the median and spread of the
per-(prompt, seed) ratios; with ``--judge``, each found suffix's completion on its own
prompt judged refused / complied / derailed (the three-way judge), and a few of them.

    python benchmarks/bench_gcg_tts.py --make-env ~/.cache/nanogcg-venv --prompts 10 --seeds 3 \\
        --variant mc:n_replace_start=4 --variant momentum:momentum=0.5 \\
        --variant probe:draft=layers:12,probe_factor=4

Run it on an otherwise idle machine: the engines run one after another.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gcg import nanogcg_python  # noqa: E402


def variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value``: a variant of the suite's GCG with these GCGConfig settings."""
    import typing

    import tomllib

    from suffix_analysis.attacks.gcg import GCGConfig
    from suffix_analysis.config import typed_value
    from suffix_analysis.errors import UserError

    name, _, body = text.partition(":")
    if not name:
        raise SystemExit(f"bench_gcg_tts: variant {text!r} has no name; write NAME:key=value,...")
    fields = typing.get_type_hints(GCGConfig)
    settings = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise SystemExit(f"bench_gcg_tts: variant {name!r}: {item!r} is not key=value with a GCG setting "
                             f"(e.g. momentum=0.5, n_replace_start=4, prefer_match=true)")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare string
        try:
            settings[key] = typed_value(f"variant {name!r}: {key}", parsed, fields[key])
        except UserError as e:
            raise SystemExit(f"bench_gcg_tts: {e}") from None
    try:
        GCGConfig(**settings).validate()
    except UserError as e:
        raise SystemExit(f"bench_gcg_tts: variant {name!r}: {e}") from None
    return name, settings


def time_to_success(ok: bool, seconds: float, budget: float) -> float:
    """A run's time to success: its seconds of steps, or inf where it failed or its last step
    (started inside the budget) ended past it."""
    return seconds if ok and seconds <= budget else math.inf


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi or math.isinf(xs[hi]):  # failures sit above the budget: no interpolating to them
        return xs[hi] if k - lo >= 0.5 or lo == hi else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(runs: list[dict], engines: list[str]) -> dict:
    """Print per engine the success rate, median time to success with its interquartile range,
    steps to success and s/step, and each engine's ratios against nanoGCG; returns the runs
    ``{engine: {(prompt, seed): run}}``."""
    by = {e: {(r["prompt"], r["seed"]): r for r in runs if r["engine"] == e} for e in engines}
    med = {}
    for e in engines:
        rows = list(by[e].values())
        tts = [r["tts"] for r in rows]
        ok = [r for r in rows if math.isfinite(r["tts"])]
        med[e] = statistics.median(tts)
        spt = sum(r["seconds"] for r in rows) / max(1, sum(r["steps"] for r in rows))
        print(f"{e:12s} success {len(ok)}/{len(rows)}  median TTS {med[e]:7.1f} s  IQR [{percentile(tts, .25):.1f}, "
              f"{percentile(tts, .75):.1f}]  median steps to success "
              f"{statistics.median([r['steps'] for r in ok]) if ok else float('nan'):.0f}  {spt:.2f} s/step")
    if "nanogcg" in by:
        for e in engines:
            if e == "nanogcg":
                continue
            pairs = [by["nanogcg"][k]["tts"] / by[e][k]["tts"] for k in by[e]
                     if math.isfinite(by[e][k]["tts"]) and math.isfinite(by["nanogcg"][k]["tts"])]
            spread = (f"median per-run ratio {statistics.median(pairs):.2f}x, IQR [{percentile(pairs, .25):.2f}, "
                      f"{percentile(pairs, .75):.2f}] over {len(pairs)} runs both solved") if pairs else "no run both solved"
            ratio = (f"{med['nanogcg'] / med[e]:.2f}x" if math.isfinite(med[e]) and math.isfinite(med["nanogcg"])
                     else "n/a (a median is above the budget)")
            print(f"{e:12s} vs nanogcg: ratio of median TTS {ratio}; {spread}")
    return by


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--prompts", type=int, default=10, help="shipped harmful val instructions, the first N")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--max-steps", type=int, default=200, help="step budget per run")
    ap.add_argument("--max-seconds", type=float, default=900, help="time budget per run (seconds of steps)")
    ap.add_argument("--target-tokens", type=int, default=4, help="tokens of the default target each run must make greedy")
    ap.add_argument("--search-width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=20)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16, for every engine")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="also run the suite's GCG with these settings (repeatable)")
    ap.add_argument("--no-nanogcg", action="store_true", help="only the suite's engines")
    ap.add_argument("--no-ours", action="store_true", help="only the variants (and nanoGCG): the suite's defaults "
                                                           "were measured in an earlier run")
    ap.add_argument("--judge", action="store_true", help="judge each found suffix's completion three ways")
    ap.add_argument("--out", help="write every run's record here (JSON)")
    ap.add_argument("--nanogcg-python", default=os.environ.get("NANOGCG_PYTHON"))
    ap.add_argument("--make-env", metavar="DIR")
    args = ap.parse_args()
    # Bad input ends here, before a model loads or anything is measured.
    if args.max_steps < 1 or args.max_seconds <= 0:
        sys.exit(f"bench_gcg_tts: the budget must be at least 1 step and more than 0 seconds "
                 f"(got --max-steps {args.max_steps}, --max-seconds {args.max_seconds:g})")
    if args.prompts < 1 or args.seeds < 1 or args.target_tokens < 1:
        sys.exit("bench_gcg_tts: --prompts, --seeds and --target-tokens must be at least 1")
    if args.judge and args.prompts < 3:
        sys.exit("bench_gcg_tts: --judge contrasts each prompt with others: pass --prompts 3 or more")
    if args.dtype not in ("float32", "bfloat16"):
        sys.exit(f"bench_gcg_tts: --dtype is float32 or bfloat16, got {args.dtype!r}")
    variants = ([] if args.no_ours else [("ours", {})]) + [variant(v) for v in args.variant]
    if not variants and args.no_nanogcg:
        sys.exit("bench_gcg_tts: nothing to run: --no-ours and --no-nanogcg without a --variant")
    if not (args.nanogcg_python or args.make_env or args.no_nanogcg):
        from suffix_analysis.attacks.nanogcg_env import resolve_python

        args.nanogcg_python = str(resolve_python())  # the suite's own env (python -m suffix_analysis.attacks.nanogcg_env)
    python = None if args.no_nanogcg else nanogcg_python(args.nanogcg_python, args.make_env)
    logging.basicConfig(format="%(message)s")

    from suffix_analysis.attacks import nanogcg_env
    from suffix_analysis.attacks.gcg import GCG, GCGConfig
    from suffix_analysis.attacks.nanogcg_adapter import NanoGCGConfig, init_string, target_is_greedy
    from suffix_analysis.attacks.targets import default_target
    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.models.loading import load_model

    val = [x.instruction for x in load_instructions("harmful:val")]
    if args.prompts > len(val):
        sys.exit(f"bench_gcg_tts: --prompts {args.prompts}: the shipped harmful val split has {len(val)}")
    cm = load_model(args.model, device="cpu", dtype=args.dtype)
    tok = cm.tokenizer
    for name, settings in variants:  # a draft the model cannot use ends here too
        if settings.get("draft"):
            from suffix_analysis.errors import UserError
            from suffix_analysis.models.draft import load_draft

            try:
                load_draft(settings["draft"], cm)
            except UserError as e:
                sys.exit(f"bench_gcg_tts: variant {name!r}: {e}")
    prompts = []
    for instr in val[: args.prompts]:
        ids = tok(default_target(instr), add_special_tokens=False)["input_ids"][: args.target_tokens]
        prompts.append((instr, tok.decode(ids)))
    threads = torch.get_num_threads()
    seeds = list(range(args.seed, args.seed + args.seeds))
    cpu_bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    print(f"model {args.model}, {args.dtype}, {threads} CPU threads (bfloat16 instructions: {cpu_bf16}); width "
          f"{args.search_width}, top-k {args.topk}, suffix {args.suffix_len} tokens; budget {args.max_steps} steps / "
          f"{args.max_seconds:g} s; {len(prompts)} prompts x {len(seeds)} seeds; target tokens {args.target_tokens}",
          flush=True)
    sizes = dict(search_width=args.search_width, topk=args.topk, suffix_len=args.suffix_len, init="x")
    runs: list[dict] = []

    def record(engine, p, seed, steps, seconds, suffix):
        instr, target = prompts[p]
        ok = target_is_greedy(cm, instr, suffix, target)
        runs.append(dict(engine=engine, prompt=p, seed=seed, steps=steps, seconds=round(seconds, 2), success=ok,
                         suffix=suffix, tts=time_to_success(ok, seconds, args.max_seconds)))
        print(f"{engine:12s} prompt {p:2d} seed {seed}: {steps:4d} steps {seconds:7.1f} s  "
              f"{'success' if ok else 'no success'}", flush=True)

    for name, settings in variants:
        for p, (instr, target) in enumerate(prompts):
            for seed in seeds:
                cfg = GCGConfig(**{**sizes, **settings, "num_steps": args.max_steps, "time_limit": args.max_seconds,
                                   "early_stop": True, "seed": seed, "checkpoint_every": 0})
                r = GCG(cfg).run(cm, [instr], [target])
                record(name, p, seed, r.extra["steps"], sum(r.step_seconds), r.suffix)
    if python is not None:
        with tempfile.TemporaryDirectory(prefix="bench_gcg_tts_") as work:
            spec = nanogcg_env.export_model(cm, Path(work) / "model")
            init = init_string(tok, "x", args.suffix_len)
            for p, (instr, target) in enumerate(prompts):
                for seed in seeds:
                    cfg = NanoGCGConfig(num_steps=args.max_steps, early_stop=True, seed=seed, **sizes)
                    spec.update(instruction=instr, target=target, threads=threads, max_seconds=args.max_seconds,
                                gcg=cfg.gcg_arguments(init))
                    r = nanogcg_env.run_nanogcg(python, spec, Path(work))
                    record("nanogcg", p, seed, len(r["losses"]), sum(r["step_seconds"]), r["best_string"])

    engines = list(dict.fromkeys(r["engine"] for r in runs))
    print(f"--- {args.dtype}, {threads} threads, {len(prompts)} prompts x {len(seeds)} seeds, budget "
          f"{args.max_steps} steps / {args.max_seconds:g} s; time to success in seconds (failures count as above "
          f"the budget)")
    by = summarize(runs, engines)
    if args.judge:
        from suffix_analysis.evaluation.compliance import load_compliance_judge
        from suffix_analysis.evaluation.refusal import evaluate_refusal

        judge = load_compliance_judge(device="cpu")
        rep = evaluate_refusal(cm, [prompts[r["prompt"]][0] for r in runs], suffixes=[r["suffix"] for r in runs],
                               max_new_tokens=48, compliance=judge, progress=False)
        for r, v, c in zip(runs, rep.compliance.verdicts, rep.completions):
            r.update(verdict=v, completion=c)
        for e in engines:
            rows = list(by[e].values())
            rates = {v: sum(r["verdict"] == v for r in rows) / len(rows) for v in ("refused", "complied", "derailed")}
            print(f"{e:12s} suffixes on their own prompts: " + "  ".join(f"{v} {x:.0%}" for v, x in rates.items()))
            for r in rows[:3]:
                print(f"    [{r['verdict']}] {r['completion'][:110]!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs,
                                              "when": time.strftime("%Y-%m-%d %H:%M")}, indent=1, default=str))


if __name__ == "__main__":
    main()
