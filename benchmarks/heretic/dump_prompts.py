"""Write the suite's instruction sets as the plain-text prompt files run_heretic.py reads.

Run with the suite's own environment (not the heretic one):

    SUFFIX_ANALYSIS_DATA=/work/shared/datasets .venv/bin/python benchmarks/heretic/dump_prompts.py /tmp/heretic-work/prompts

Writes, one prompt per line:

    good.txt       harmless instructions, used for the refusal directions   (default harmless:train)
    bad.txt        harmful instructions, used for the refusal directions    (default harmful:train)
    good_eval.txt  harmless instructions, used for the KL divergence        (default harmless:val)
    bad_eval.txt   harmful instructions, used for the refusal count          (default harmful:val)
    refusal_markers.txt  the suite's refusal phrases (added to heretic's own markers)
    manifest.json  which set went where, and the counts

Any set can be swapped with --good/--bad/--good-eval/--bad-eval SPEC, where SPEC is anything
``suffix_analysis.datasets.load_instructions`` accepts (``harmful:val``, ``advbench``, a file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from suffix_analysis.artifacts import write_text_atomic
from suffix_analysis.datasets import load_instructions
from suffix_analysis.evaluation.refusal import REFUSAL_PHRASES

ROLES = {"good": "harmless:train", "bad": "harmful:train",
         "good_eval": "harmless:val", "bad_eval": "harmful:val"}


def _one_line(text: str) -> str:
    # Heretic reads one prompt per line; none of the shipped sets has line breaks, but a file
    # passed by the user might, so fold them rather than silently splitting a prompt in two.
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--data-dir", default=None, help="canonical datasets folder (default $SUFFIX_ANALYSIS_DATA)")
    for role, default in ROLES.items():
        ap.add_argument(f"--{role.replace('_', '-')}", dest=role, default=default,
                        help=f"instruction set for {role}.txt (default {default})")
    args = ap.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for role in ROLES:
        spec = getattr(args, role)
        prompts = [_one_line(x.instruction) for x in load_instructions(spec, args.data_dir)]
        prompts = [p for p in prompts if p]
        write_text_atomic(args.out_dir / f"{role}.txt", "\n".join(prompts) + "\n")
        manifest[role] = {"spec": spec, "n": len(prompts)}
    write_text_atomic(args.out_dir / "refusal_markers.txt", "\n".join(REFUSAL_PHRASES) + "\n")
    manifest["refusal_markers"] = {"source": "suffix_analysis.evaluation.refusal.REFUSAL_PHRASES",
                                   "n": len(REFUSAL_PHRASES)}
    write_text_atomic(args.out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
