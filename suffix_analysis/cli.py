"""The ``suffix-analysis`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import UserError

log = logging.getLogger("suffix_analysis")


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="preset name, Hugging Face id, model folder or .gguf file (default: smollm2-135m)")
    p.add_argument("--preset", help="preset that supplies template and refusal tokens for a folder or HF id")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (Qwen-1)")


def _load(args):
    from .models.loading import load_model

    return load_model(args.model, preset=args.preset, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)


def cmd_refusal(args) -> int:
    from .datasets import load_instructions
    from .evaluation.refusal import evaluate_refusal

    items = load_instructions(args.instructions, args.data_dir)
    if args.limit:
        items = items[: args.limit]
    out = None
    if args.out:
        from .artifacts import ensure_dir

        out = ensure_dir(args.out)
    cm = _load(args)
    report = evaluate_refusal(cm, [x.instruction for x in items], max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, progress=not args.quiet)
    summary = {"model": args.model, "instructions": args.instructions, **report.summary(),
               "max_new_tokens": args.max_new_tokens}
    if out:
        from .artifacts import write_json_atomic

        write_json_atomic(out / "completions.json", report.rows())
        write_json_atomic(out / "refusal.json", summary)
    print(f"model          {args.model}")
    print(f"instructions   {args.instructions} (n={report.n})")
    print(f"refusal rate   {report.refusal_rate:.1%}  ({report.judge} judge, {args.max_new_tokens} new tokens)")
    print(f"refusal score  {report.refusal_score:+.3f}  (mean log-odds of {cm.preset.refusal_tokens if cm.preset else 'refusal tokens'})")
    if out:
        print(f"saved          {out}/completions.json, {out}/refusal.json")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_organism_build(args) -> int:
    from .models.organism import ensure_organism

    folder = ensure_organism(seed=args.seed, out=args.out, progress=not args.quiet)
    record = json.loads((folder / "organism.json").read_text())
    ev = record["evaluation"]
    print(f"refusal rate on shipped harmful val   {ev['harmful_val']['refusal_rate']:.1%} (n={ev['harmful_val']['n']})")
    print(f"false refusals on shipped harmless val {ev['harmless_val']['false_refusal_rate']:.1%} "
          f"(n={ev['harmless_val']['n']})")
    print(folder)
    return 0


def cmd_presets(args) -> int:
    from .models.presets import PRESETS

    for p in PRESETS.values():
        paper = f"  paper direction (pos, layer) = {p.paper_direction}" if p.paper_direction else ""
        print(f"{p.name:28s} {p.source:52s} template={p.template:8s} refusal={list(p.refusal_tokens)}{paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="suffix-analysis", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("refusal", help="generate greedily and report refusal rate and refusal score")
    _add_model_args(p)
    p.add_argument("--instructions", required=True,
                   help="instruction file (.json/.csv/.txt), shipped set (harmful:val) or dataset name")
    p.add_argument("--data-dir", help="folder of canonical datasets (default: $SUFFIX_ANALYSIS_DATA)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--limit", type=_positive_int, help="use only the first K instructions")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--out", help="folder to save completions.json and refusal.json in")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_refusal)

    p = sub.add_parser("organism", help="the refusal organism (safety-tuned smollm2-135m)")
    osub = p.add_subparsers(dest="organism_command", required=True, parser_class=_Parser)
    b = osub.add_parser("build", help="build (or fetch from cache) the refusal organism and print its folder")
    b.add_argument("--out", help="also copy the model folder here")
    b.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_organism_build)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:
        print(f"suffix-analysis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("suffix-analysis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
