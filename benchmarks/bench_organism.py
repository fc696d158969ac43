"""The shipped organism against a fresh build of its recipe, side by side, and the time to
an organism from an empty cache.

    python benchmarks/bench_organism.py --ready-only        # seconds from an empty cache
    python benchmarks/bench_organism.py [--seed 0] [--direction-shipped RUN --direction-rebuilt RUN]

1. Time to ready: a fresh cache folder, ``load_model("smollm2-135m-refusal")`` (GGUF
   dequantization + the delta's merge + the load), in a subprocess so that no import or
   file is warm.
2. Retrain: ``organism.build`` with the recipe's defaults into a temporary file (minutes:
   self-distillation, then training), then the faithfulness checks of
   ``suffix-analysis organism evaluate`` on the shipped delta and on the rebuilt one, the
   same held-out prompts and suffixes, printed side by side with the merged weights'
   checksums (equal only where the build ran on a CPU of the same kind: training is not
   bit-reproducible across kernels; loading is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = """
import time, json
t0 = time.perf_counter()
from suffix_analysis.models.loading import load_model
cm = load_model("smollm2-135m-refusal", device="cpu", progress=False)
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "fingerprint": cm.fingerprint(), "folder": cm.location}))
"""


def ready_time() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SUFFIX_ANALYSIS_CACHE": cache}
        env.pop("SUFFIX_ANALYSIS_ORGANISM_DELTA", None)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", READY], env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        res = json.loads(out.stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()  # and once more, from the now warm cache
        warm = json.loads(subprocess.run([sys.executable, "-c", READY], env=env, capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
        res.update(wall_with_interpreter=wall, warm_seconds=warm["seconds"])
    return res


def faithfulness(delta: Path | None, direction: str | None) -> dict:
    from suffix_analysis.models.loading import ORGANISM_DELTA_ENV, load_model
    from suffix_analysis.organism.faithfulness import evaluate_faithfulness

    if delta is not None:
        os.environ[ORGANISM_DELTA_ENV] = str(delta)
    else:
        os.environ.pop(ORGANISM_DELTA_ENV, None)
    cm = load_model("smollm2-135m-refusal", device="cpu", progress=False)
    results, _ = evaluate_faithfulness(cm, direction, progress=False)
    results["fingerprint"] = cm.fingerprint()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ready-only", action="store_true", help="only the time to an organism from an empty cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta", help="a delta built before (skip the retraining)")
    ap.add_argument("--direction-shipped", help="a direction run of the shipped organism (adds the direction checks)")
    ap.add_argument("--direction-rebuilt", help="a direction run of the rebuilt organism")
    args = ap.parse_args()

    r = ready_time()
    print(f"ready from an empty cache: {r['seconds']:.1f} s in the process ({r['wall_with_interpreter']:.1f} s with "
          f"the interpreter), {r['warm_seconds']:.1f} s warm; fingerprint {r['fingerprint']}")
    if args.ready_only:
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from suffix_analysis.models.delta import load_delta
    from suffix_analysis.models.loading import shipped_delta
    from suffix_analysis.organism import ORGANISM_PRESET, build

    if args.delta:
        rebuilt = load_delta(args.delta)
    else:
        out = Path(tempfile.mkdtemp()) / "rebuilt.safetensors"
        t0 = time.perf_counter()
        rebuilt = build(out, seed=args.seed, progress=True)
        print(f"rebuilt in {time.perf_counter() - t0:.0f} s: {out}")
    shipped = load_delta(shipped_delta(ORGANISM_PRESET))
    a = faithfulness(None, args.direction_shipped)
    b = faithfulness(rebuilt.path, args.direction_rebuilt)
    print(f"\nmerged SHA-256: shipped {shipped.merged_sha256[:16]}, rebuilt {rebuilt.merged_sha256[:16]} "
          f"({'identical' if shipped.merged_sha256 == rebuilt.merged_sha256 else 'different'}); "
          f"fingerprints {a['fingerprint']} / {b['fingerprint']}")
    print(f"{'check':<18} {'quantity':<14} {'shipped':>8} {'rebuilt':>8}  target")
    for name, ra in a.items():
        if not isinstance(ra, dict) or "target" not in ra:
            continue
        rb = b.get(name, {})
        for q in ("refused", "complied", "derailed", "complied_drop", "kl"):
            if q in ra:
                print(f"{name:<18} {q:<14} {ra[q]:>8.3f} {rb.get(q, float('nan')):>8.3f}  "
                      f"{ra['target'] if ra['target'].startswith(q) else ''}")


if __name__ == "__main__":
    main()
