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


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _number(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _layer_list(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer numbers") from None


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


def _intervention(cm, args):
    """The context manager for --direction/--intervention/--coeff."""
    import contextlib

    if args.intervention == "none":
        return contextlib.nullcontext()
    from .interventions.hooks import ablate_direction, add_direction
    from .pipeline import load_direction

    direction, info = load_direction(args.direction, cm)
    if args.intervention == "ablate":
        return ablate_direction(cm, direction)
    return add_direction(cm, direction, info["layer"], args.coeff)


def _suffix_text(spec: str | None) -> str | None:
    """--suffix: an attack run folder (its suffix.json) or the suffix text itself."""
    if not spec:
        return None
    from pathlib import Path

    p = Path(spec).expanduser()
    if p.is_dir():
        f = p / "suffix.json"
        if not f.is_file():
            raise UserError(f"{p} has no suffix.json; run `suffix-analysis attack ... --out {p}` first")
        return json.loads(f.read_text())["suffix"]
    return spec


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
    if args.intervention != "none" and not args.direction:
        raise UserError(f"--intervention {args.intervention} needs --direction RUN")
    cm = _load(args)
    from .evaluation.refusal import make_judge

    judge = make_judge(args.judge, args.device)
    suffix = _suffix_text(args.suffix)
    with _intervention(cm, args):
        report = evaluate_refusal(cm, [x.instruction for x in items], judge=judge, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=not args.quiet,
                                  suffixes=[suffix] * len(items) if suffix else None)
    summary = {"model": args.model, "instructions": args.instructions, **report.summary(),
               "max_new_tokens": args.max_new_tokens, "intervention": args.intervention}
    if args.intervention == "actadd":
        summary["coeff"] = args.coeff
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


def cmd_organism_check(args) -> int:
    from .datasets import load_instructions, shipped
    from .directions.sweep import ablation_sweep
    from .models.loading import load_model

    harmful_eval = [x.instruction for x in load_instructions(args.instructions, args.data_dir)]
    cm = load_model(args.model, device=args.device)
    layers = args.layers
    base, rows = ablation_sweep(
        cm, [x.instruction for x in shipped("harmful", "train")], [x.instruction for x in shipped("harmless", "train")],
        harmful_eval, position=args.position, layers=layers, max_new_tokens=args.max_new_tokens,
        progress=not args.quiet)
    below = [r.layer for r in rows if r.refusal_rate < args.threshold]
    print(f"baseline refusal {base:.1%} on {args.instructions} (n={len(harmful_eval)})")
    print(f"layers whose position {args.position} direction, ablated, leaves refusal below {args.threshold:.0%}: "
          f"{below or 'none'}")
    if args.json:
        print(json.dumps({"baseline": base, "rows": [r.__dict__ for r in rows], "layers_below": below}))
    return 0


def cmd_direction(args) -> int:
    from .pipeline import DirectionConfig, run_direction

    cfg = DirectionConfig(
        harmful_train=args.harmful_train, harmless_train=args.harmless_train, harmful_val=args.harmful_val,
        harmless_val=args.harmless_val, n_train=args.n_train, n_val=args.n_val, filter_train=args.filter_train,
        filter_val=args.filter_val,
        seed=args.seed, prune_layer_fraction=args.prune_layers, kl_threshold=args.kl_threshold,
        induce_threshold=args.induce_threshold, batch_size=args.batch_size)
    cm = _load(args)
    info = run_direction(cm, args.out, cfg, args.data_dir, progress=not args.quiet)
    print(f"selected direction  position {info['position']}, layer {info['layer']} of {cm.n_layers}")
    print(f"bypass score        {info['bypass']:+.3f}   (mean refusal score on harmful val, ablated)")
    print(f"induce score        {info['induce']:+.3f}   (mean refusal score on harmless val, added)")
    print(f"KL                  {info['kl']:.4f}    (first token, harmless val, ablated vs clean)")
    print(f"saved               {args.out}/direction.safetensors, direction.json, candidates.csv")
    if args.json:
        print(json.dumps(info))
    return 0


def cmd_orthogonalize(args) -> int:
    from .interventions.orthogonalize import export_orthogonalized
    from .pipeline import load_direction

    cm = _load(args)
    direction, info = load_direction(args.direction, cm)
    out = export_orthogonalized(cm, direction, args.out, {"source_model": args.model, "direction_run": str(args.direction),
                                                           "position": info["position"], "layer": info["layer"]})
    print(f"orthogonalized model saved to {out} (loads with transformers.AutoModelForCausalLM)")
    return 0


def cmd_evaluate(args) -> int:
    from .datasets import load_file, load_instructions
    from .evaluation.report import evaluate_direction
    from .models.loading import load_model
    from .pipeline import load_direction

    harmful = [x.instruction for x in load_instructions(args.harmful, args.data_dir)][: args.limit]
    harmless = [x.instruction for x in load_instructions(args.harmless, args.data_dir)][: args.limit]
    corpus = [x.instruction for x in load_file(args.corpus)] if args.corpus else None
    cm = _load(args)
    direction, info = load_direction(args.direction, cm)
    ortho = load_model(args.orthogonalized, device=args.device, dtype=args.dtype) if args.orthogonalized else None
    rows = evaluate_direction(cm, direction, info["layer"], harmful, harmless, coeff=args.coeff, corpus=corpus,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              orthogonalized=ortho, progress=not args.quiet)
    print(f"direction: position {info['position']}, layer {info['layer']}; harmful = {args.harmful} (n={len(harmful)}), "
          f"harmless = {args.harmless} (n={len(harmless)}), substring judge, {args.max_new_tokens} new tokens")
    cols = [k for k in rows[0] if k != "condition"]
    print(f"{'condition':28s}" + "".join(f"{c:>26s}" for c in cols))
    for r in rows:
        print(f"{r['condition']:28s}" + "".join(f"{r[c]:26.3f}" for c in cols))
    if args.out:
        from .artifacts import ensure_dir, write_json_atomic

        write_json_atomic(ensure_dir(args.out) / "evaluation.json",
                          {"direction": info, "harmful": args.harmful, "harmless": args.harmless, "rows": rows})
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_attack(args) -> int:
    import dataclasses
    import logging as _logging
    from pathlib import Path

    from .artifacts import ensure_dir, write_json_atomic
    from .attacks import get_attack
    from .attacks.targets import default_target, load_targets
    from .datasets import load_instructions

    cls = get_attack(args.name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    given = {"num_steps": args.steps, "search_width": args.search_width, "topk": args.topk,
             "suffix_len": args.suffix_len, "objective": args.objective, "seed": args.seed,
             "n_replace": args.n_replace, "buffer_size": args.buffer_size, "batch_size": args.batch_size,
             "checkpoint_every": args.checkpoint_every, "init": args.init, "prune_after": args.prune_after,
             "prune_every": args.prune_every, "bound_vocab": args.bound_vocab,
             "progressive": False if args.all_prompts else None, "early_stop": False if args.no_early_stop else None}
    cfg = cls.config_class(**{k: v for k, v in given.items() if v is not None and k in fields})
    items = load_instructions(args.instructions, args.data_dir)[: args.n_prompts]
    instructions = [x.instruction for x in items]
    targets = load_targets(args.targets, len(instructions)) if args.targets else [default_target(i) for i in instructions]
    cm = _load(args)
    kwargs = {}
    if args.direction:
        from .pipeline import load_direction

        vec, info = load_direction(args.direction, cm)
        kwargs["direction"] = (vec, info["layer"])
    elif "direction" in (args.objective or ""):
        raise UserError("--objective direction needs --direction RUN")
    attack = cls(cfg, **kwargs)  # validates the config
    out = ensure_dir(args.out)  # only once the settings, model and direction are known to be good
    _logging.getLogger("suffix_analysis.attacks").setLevel(_logging.INFO)
    result = attack.run(cm, instructions, targets, out=Path(out), resume=args.resume)
    record = {**result.to_dict(), "model": args.model, "fingerprint": cm.fingerprint(),
              "instructions": instructions, "targets": targets, "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "suffix.json", record)
    steps = len(result.step_seconds)
    mean = sum(result.step_seconds) / max(steps, 1)
    print(f"attack        {args.name} on {len(instructions)} prompt(s), {steps} steps, {mean:.2f} s per step")
    if result.losses:
        print(f"loss          {result.losses[0]:.4f} -> {result.losses[-1]:.4f} (best {min(result.losses):.4f})")
    print(f"success       {result.success}")
    print(f"suffix        {result.suffix!r}")
    print(f"saved         {out}/suffix.json")
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
    p.add_argument("--judge", default="substring",
                   help="substring (default) or llamaguard:MODEL (a moderation model whose weights you have)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--out", help="folder to save completions.json and refusal.json in")
    p.add_argument("--suffix", help="append this suffix (text, or an attack run folder) to every instruction")
    p.add_argument("--direction", help="direction run folder (from `suffix-analysis direction`)")
    p.add_argument("--intervention", choices=["none", "ablate", "actadd"], default="none",
                   help="ablate the direction everywhere, or add it at its layer (default none)")
    p.add_argument("--coeff", type=_number, default=1.0, help="activation addition coefficient (default 1)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_refusal)

    p = sub.add_parser("direction", help="extract and select the refusal direction into a run folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="run folder (rerunning skips finished stages)")
    p.add_argument("--harmful-train", default="harmful:train")
    p.add_argument("--harmless-train", default="harmless:train")
    p.add_argument("--harmful-val", default="harmful:val")
    p.add_argument("--harmless-val", default="harmless:val")
    p.add_argument("--data-dir", help="folder of canonical datasets (default: $SUFFIX_ANALYSIS_DATA)")
    p.add_argument("--n-train", type=_positive_int, default=128)
    p.add_argument("--n-val", type=_positive_int, default=32)
    p.add_argument("--no-filter-train", dest="filter_train", action="store_false",
                   help="keep all train prompts (default: drop those the model treats the other way)")
    p.add_argument("--no-filter-val", dest="filter_val", action="store_false",
                   help="keep all val prompts (default: as the paper, drop harmful val prompts the model does not "
                        "refuse and harmless ones it does, by refusal score)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-layers", type=_fraction, default=0.2, help="drop candidates in this last share of layers")
    p.add_argument("--kl-threshold", type=_number, default=0.1)
    p.add_argument("--induce-threshold", type=_number, default=0.0)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_direction)

    p = sub.add_parser("orthogonalize", help="bake the direction's ablation into the weights and save the model")
    _add_model_args(p)
    p.add_argument("--direction", required=True, help="direction run folder")
    p.add_argument("--out", required=True, help="folder for the edited model")
    p.set_defaults(func=cmd_orthogonalize)

    p = sub.add_parser("evaluate", help="refusal and side effects under ablation, addition, orthogonalization")
    _add_model_args(p)
    p.add_argument("--direction", required=True, help="direction run folder")
    p.add_argument("--harmful", default="harmful:test", help="held-out harmful instructions (default harmful:test)")
    p.add_argument("--harmless", default="harmless:test", help="held-out harmless instructions")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=_positive_int, default=100, help="at most K instructions per set (default 100)")
    p.add_argument("--corpus", help="plain text file (one text per line) for cross-entropy")
    p.add_argument("--orthogonalized", help="an exported orthogonalized model folder to evaluate too")
    p.add_argument("--coeff", type=_number, default=1.0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--out", help="folder to write evaluation.json in")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("attack", help="find an adversarial suffix (gcg, random, nanogcg, or a plugged-in attack)")
    p.add_argument("name", help="attack name (gcg, random, nanogcg, or one from an installed plugin)")
    _add_model_args(p)
    p.add_argument("--instructions", required=True, help="instruction file, shipped set or dataset name")
    p.add_argument("--targets", help="target responses, aligned with the instructions (default: 'Sure, here is ...')")
    p.add_argument("--data-dir")
    p.add_argument("--n-prompts", type=_positive_int, default=1,
                   help="optimize one universal suffix over the first K instructions (default 1)")
    p.add_argument("--out", required=True, help="run folder for suffix.json and checkpoints")
    p.add_argument("--steps", type=_positive_int)
    p.add_argument("--search-width", type=_positive_int)
    p.add_argument("--topk", type=_positive_int)
    p.add_argument("--suffix-len", type=int)
    p.add_argument("--n-replace", type=_positive_int)
    p.add_argument("--buffer-size", type=int)
    p.add_argument("--batch-size", type=int, help="candidates per forward pass (default: all, halved on OOM)")
    p.add_argument("--init", help="initial suffix token (repeated) or string")
    p.add_argument("--all-prompts", action="store_true",
                   help="optimize on every prompt from the first step (default: add them one by one as each succeeds)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="keep optimizing after every prompt succeeds (a margin helps a universal suffix transfer)")
    p.add_argument("--prune-after", type=int,
                   help="target tokens scored before a candidate may be rejected early (0: off; exact either way)")
    p.add_argument("--prune-every", type=int,
                   help="after that, survivors are scored this many target tokens at a time (0: to the end)")
    p.add_argument("--bound-vocab", type=int,
                   help="early rejection bounds the cross-entropy over the current suffix's this many likeliest "
                        "tokens per target position (0: full unembedding; exact either way)")
    p.add_argument("--objective", help="target, refusal, direction, attention, or a sum like target+direction")
    p.add_argument("--direction", help="direction run folder (for the direction objective)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("organism", help="the refusal organism (safety-tuned smollm2-135m)")
    osub = p.add_subparsers(dest="organism_command", required=True, parser_class=_Parser)
    b = osub.add_parser("build", help="build (or fetch from cache) the refusal organism and print its folder")
    b.add_argument("--out", help="also copy the model folder here")
    b.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_organism_build)

    c = osub.add_parser("check", help="single-direction check: ablate each layer's diff-in-means direction")
    c.add_argument("--model", default="smollm2-135m-refusal")
    c.add_argument("--device", default="auto")
    c.add_argument("--instructions", default="harmful:val", help="harmful instructions to evaluate on")
    c.add_argument("--data-dir")
    c.add_argument("--position", type=int, default=-1, help="EOI position of the direction (default -1)")
    c.add_argument("--layers", type=_layer_list, default=None, help="comma-separated layers (default: all)")
    c.add_argument("--max-new-tokens", type=_positive_int, default=64)
    c.add_argument("--threshold", type=_fraction, default=0.2)
    c.add_argument("--json", action="store_true")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_organism_check)

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
