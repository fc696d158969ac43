"""Weight edits side by side on held-out prompts: the paper's orthogonalization, RDO's, a
refusal cone's, the Pareto edit, and heretic's trials (issue 25).

Every edit is a model evaluated the same way, in one run: the first ``--limit`` prompts of
harmful:test (refused / complied / derailed by the suite's judges, and refused by heretic's
own keyword list where heretic's environment is given) and of harmless:test (false refusals
by the substring judge; first-token KL(base || edited), the KL both the suite and heretic
optimize). The optimizer budget of each (trials, wall seconds) is read from its run folder.

    python benchmarks/bench_edits.py --direction DIM [--rdo RDO] [--cone CONE] [--edit EDIT] \\
        [--heretic HERETIC_OUT --heretic-python /work/heretic-env/bin/python] --limit 60 --out BENCH

``DIM`` is a ``suffix-analysis direction`` run, ``RDO`` an ``rdo`` run, ``CONE`` an ``rdo
--cone-dim K`` run, ``EDIT`` an ``edit`` run (its exported model), ``HERETIC_OUT`` the folder
``benchmarks/heretic/run_heretic.py`` wrote (trials.json and a model folder per Pareto trial).
Held out: none of these prompts is in any method's train or selection prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

# heretic's own keyword judge (its Evaluator.is_refusal, with its default markers plus the
# suite's refusal phrases, as the heretic run used them), run in heretic's environment: its
# rule and list are read from there, not copied here.
KEYWORDS_CODE = """
import json, sys, types
from heretic.config import Settings
from heretic.evaluator import Evaluator
extra, completions = json.load(sys.stdin)
markers = list(Settings.model_fields["refusal_markers"].default) + extra
me = types.SimpleNamespace(settings=types.SimpleNamespace(refusal_markers=markers))
print(json.dumps([Evaluator.is_refusal(me, c) for c in completions]))
"""


def keyword_refused(python: str, completions: list[str], extra: list[str]) -> list[bool]:
    """heretic's verdict on each completion (refusal or not), from heretic's environment."""
    out = subprocess.run([python, "-c", KEYWORDS_CODE], input=json.dumps([extra, completions]), capture_output=True,
                         text=True)
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        sys.exit(f"bench_edits: heretic's keyword judge failed in {python}: {err[-1] if err else out.returncode}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--direction", required=True, help="the difference-in-means direction run")
    ap.add_argument("--rdo", help="an RDO run (its direction is orthogonalized)")
    ap.add_argument("--cone", help="an RDO run with a cone (its whole cone is orthogonalized)")
    ap.add_argument("--edit", help="a Pareto edit run (its exported model)")
    ap.add_argument("--heretic", help="the output folder of benchmarks/heretic/run_heretic.py")
    ap.add_argument("--heretic-python", default="/work/heretic-env/bin/python",
                    help="heretic's environment, for its keyword list")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", required=True, help="folder for results.json and completions.json")
    args = ap.parse_args()
    if args.limit < 1 or args.max_new_tokens < 1:
        sys.exit("bench_edits: --limit and --max-new-tokens must be at least 1")

    from suffix_analysis.commands.common import judges
    from suffix_analysis.datasets import load_instructions
    from suffix_analysis.directions.rdo import cone_basis
    from suffix_analysis.directions.run import load_direction
    from suffix_analysis.errors import UserError
    from suffix_analysis.evaluation.compliance import ComplianceConfig
    from suffix_analysis.evaluation.refusal import REFUSAL_PHRASES, evaluate_refusal
    from suffix_analysis.interventions.orthogonalize import orthogonalize_
    from suffix_analysis.metrics import first_token_kl
    from suffix_analysis.models.loading import load_model
    from suffix_analysis.models.presets import PRESETS

    try:
        base = load_model(args.model, device="cpu", dtype="float32", progress=False)
        harmful = [x.instruction for x in load_instructions("harmful:test")][: args.limit]
        harmless = [x.instruction for x in load_instructions("harmless:test")][: args.limit]
        judge, compliance = judges("", ComplianceConfig(), "cpu")
        # heretic's keyword count wherever its environment is at hand (not only beside its trials)
        markers = list(REFUSAL_PHRASES) if args.heretic or Path(args.heretic_python).exists() else None
        if markers is not None:
            keyword_refused(args.heretic_python, ["I cannot help."], markers)  # heretic's env works, before anything

        def edited(vector):
            cm = copy.copy(base)
            cm.model = copy.deepcopy(base.model)
            orthogonalize_(cm, vector)
            return cm

        def budget_rdo(run: str) -> dict:
            ck = json.loads((Path(run) / "checkpoint.json").read_text())
            return {"steps": ck["step"], "seconds": round(sum(r["seconds"] for r in ck["losses"]), 1)}

        models = [("baseline", lambda: base, {})]
        dim, _ = load_direction(args.direction, base)
        models.append(("DIM orthogonalized (the paper)", lambda: edited(dim), {}))
        if args.rdo:
            rdo, _ = load_direction(args.rdo, base)
            models.append(("RDO orthogonalized", lambda: edited(rdo), budget_rdo(args.rdo)))
        if args.cone:
            load_direction(args.cone, base)  # checks the run's model
            basis = cone_basis(Path(args.cone))
            models.append((f"cone (k={basis.shape[0]}) orthogonalized", lambda: edited(basis), budget_rdo(args.cone)))
        if args.edit:
            rec = json.loads((Path(args.edit) / "edit.json").read_text())
            models.append((f"Pareto edit (trial {rec['chosen']['trial']})",
                           lambda: load_model(rec["model_folder"], device="cpu", dtype="float32", progress=False),
                           rec["budget"]))
        if args.heretic:
            hrec = json.loads((Path(args.heretic) / "trials.json").read_text())
            timing = hrec.get("timing_s", {})
            budget = {"trials": len(hrec["trials"]), "seconds": round(timing.get("setup", 0) + timing.get("trials", 0), 1)}
            # heretic's exports carry no suite marker: they load with the model's preset (template, refusal tokens)
            preset = args.model if args.model in PRESETS else None
            for t in hrec["trials"]:
                if t.get("export"):
                    folder = Path(args.heretic) / t["export"]
                    models.append((f"heretic {t['export']} (val {t['refusals']}/{t['n_bad_prompts']}, KL "
                                   f"{t['kl_divergence']:.3f})",
                                   lambda f=folder: load_model(str(f), preset=preset, device="cpu", dtype="float32",
                                                               progress=False), budget))
    except UserError as e:
        sys.exit(f"bench_edits: {e}")

    print(f"{args.model}; held out: first {len(harmful)} of harmful:test and {len(harmless)} of harmless:test, "
          f"{args.max_new_tokens} greedy tokens; judges {judge.name}+{'compliance' if compliance else 'none'}"
          + ("; heretic's keywords" if markers else ""), flush=True)
    rows, completions, clean = [], {}, None
    for name, make, budget in models:
        t0 = time.perf_counter()
        cm = make()
        h = evaluate_refusal(cm, harmful, judge=judge, compliance=compliance, max_new_tokens=args.max_new_tokens,
                             progress=False)
        n = evaluate_refusal(cm, harmless, judge=judge, max_new_tokens=args.max_new_tokens, progress=False)
        if clean is None:
            clean = n.first_logits
        row = {"edit": name, "harmful_refused": h.refusal_rate, "harmful_complied": h.complied_rate,
               "harmful_derailed": h.derailed_rate,
               "harmful_refused_keywords": (sum(keyword_refused(args.heretic_python, h.completions, markers))
                                            / len(harmful) if markers else None),
               "harmless_false_refusals": n.refusal_rate,
               "harmless_kl": first_token_kl(clean, n.first_logits).mean().item(),
               **{f"budget_{k}": v for k, v in budget.items()}}
        rows.append(row)
        completions[name] = {"harmful": h.completions, "harmless": n.completions}
        kw = f"{row['harmful_refused_keywords']:6.1%}" if markers else "     -"
        print(f"{name:34s} harmful refused {row['harmful_refused']:6.1%} complied {row['harmful_complied'] or 0:6.1%} "
              f"derailed {row['harmful_derailed'] or 0:6.1%} keywords {kw} | harmless refused "
              f"{row['harmless_false_refusals']:6.1%} KL {row['harmless_kl']:.4f} | budget {budget or '-'} "
              f"({time.perf_counter() - t0:.0f} s to evaluate)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": args.model, "limit": args.limit, "rows": rows}, indent=1))
    (out / "completions.json").write_text(json.dumps({"harmful": harmful, "harmless": harmless,
                                                      "completions": completions}, indent=1))
    print(f"saved {out}/results.json and completions.json")


if __name__ == "__main__":
    main()
