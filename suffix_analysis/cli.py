"""The ``suffix-analysis`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import finite_float
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


def _fraction(text: str) -> float:
    v = finite_float(text)
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


REFUSING_MODEL = "smollm2-135m-refusal"  # the default wherever a command studies refusal


def _model_args(p: argparse.ArgumentParser, default: str = REFUSING_MODEL) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help=f"preset name, Hugging Face id, model folder or .gguf file (default: {default})")
    g.add_argument("--preset", help="preset that supplies template and refusal tokens for a folder or HF id")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (Qwen-1)")
    from .config import add_arguments
    from .models.placement import Placement

    add_arguments(p.add_argument_group("placement over devices (accelerate, bitsandbytes)"), Placement)


def _placement(args):
    from .config import from_arguments
    from .models.placement import Placement

    return from_arguments(Placement, args)


def _data_args(p: argparse.ArgumentParser, instructions: str | None = None, what: str = "instructions"):
    g = p.add_argument_group("data")
    if instructions is not None:
        g.add_argument("--instructions", required=instructions == "", default=instructions or None,
                       help=f"{what}: a file (.json/.csv/.txt), a shipped set (harmful:val) or a dataset name"
                            + (f" (default: {instructions})" if instructions else ""))
    g.add_argument("--data-dir", help="folder of canonical datasets (default: $SUFFIX_ANALYSIS_DATA)")
    return g


def _output_args(p: argparse.ArgumentParser, out: str | None, out_required: bool = False, json_flag: bool = True,
                 quiet: bool = True) -> None:
    g = p.add_argument_group("output")
    if out is not None:
        g.add_argument("--out", required=out_required, help=out)
    if json_flag:
        g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    if quiet:
        g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _judge_args(p: argparse.ArgumentParser) -> None:
    from .config import add_arguments
    from .evaluation.compliance import ComplianceConfig

    g = p.add_argument_group("judges (ComplianceConfig)")
    g.add_argument("--judge", default=None,
                   help="comma-separated: a refusal judge, substring or llamaguard:MODEL, and compliance[:MODEL] "
                        "(default: substring,compliance; compliance only where its reference model is available "
                        "offline). Refused / complied / derailed: refused by the refusal judge; not refused and "
                        "answering the instruction by the compliance judge; neither")
    add_arguments(g, ComplianceConfig)


def _direction_args(p: argparse.ArgumentParser, required: bool, what: str = "direction run folder") -> None:
    g = p.add_argument_group("direction")
    g.add_argument("--direction", required=required, help=f"{what} (from `suffix-analysis direction`)")
    g.add_argument("--allow-other-model", action="store_true",
                   help="apply a direction made from another model's weights (e.g. a base model's to its chat "
                        "model) on purpose; recorded in the outputs")


def _model_options(args):
    from .commands.common import ModelOptions

    return ModelOptions(model=args.model, preset=args.preset or "", device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, placement=_placement(args))


def _load(args):
    return _model_options(args).load(progress=not getattr(args, "quiet", False))


def _direction(cm, args):
    """(vector, record) of --direction, checked against the model."""
    from .directions.run import load_direction

    return load_direction(args.direction, cm, allow_other_model=args.allow_other_model)


def _provenance(info: dict) -> dict:
    """What outputs record about the direction they used."""
    return {"direction_run": info["run"], "direction_model": info["model"], "direction_other_model": info["other_model"],
            "position": info["position"], "layer": info["layer"]}


def _intervention(cm, args):
    """The context manager for --direction/--intervention/--coeff, and the direction's record."""
    import contextlib

    if args.intervention == "none":
        return contextlib.nullcontext(), None
    from .interventions.directional import ablate_direction, add_direction

    direction, info = _direction(cm, args)
    if args.intervention == "ablate":
        return ablate_direction(cm, direction), info
    return add_direction(cm, direction, info["layer"], args.coeff), info


def _suffix_record(spec: str | None) -> dict | None:
    """The attack record (suffix.json) of --suffix when it names a run folder, else None."""
    from pathlib import Path

    p = Path(spec).expanduser() if spec else None
    if p is None or not p.is_dir():
        return None
    f = p / "suffix.json"
    if not f.is_file():
        raise UserError(f"{p} has no suffix.json; run `suffix-analysis attack ... --out {p}` first")
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("suffix"), str):
        raise UserError(f"{f} is not an attack record with a suffix (truncated or edited?); run "
                        f"`suffix-analysis attack ... --out {p}` again")
    return record


def _suffix_text(spec: str | None) -> str | None:
    """--suffix: an attack run folder (its suffix.json) or the suffix text itself."""
    record = _suffix_record(spec)
    return record["suffix"] if record is not None else (spec or None)


def _judges(args):
    """(refusal judge, compliance judge or None) of --judge and the compliance flags; prints
    why the default compliance judge is off, if it is."""
    from .config import from_arguments
    from .evaluation.compliance import ComplianceConfig
    from .evaluation.refusal import make_judges

    cfg = from_arguments(ComplianceConfig, args)
    cfg.validate()
    judge, compliance, note = make_judges(args.judge, cfg, args.device)
    if note:
        log.warning(note)
    return judge, compliance


def _eval_targets(args, instructions: list[str]) -> list[str] | None:
    """--targets for the exact-match rate: a file, ``default`` ("Sure, here is ..."), or, for a
    suffix run made with the default targets, those targets for these instructions."""
    from .attacks.targets import default_target, load_targets

    if args.targets == "default":
        return [default_target(i) for i in instructions]
    if args.targets:
        return load_targets(args.targets, len(instructions))
    rec = _suffix_record(args.suffix)
    if rec and rec.get("targets") and rec["targets"] == [default_target(i) for i in rec.get("instructions", [])]:
        return [default_target(i) for i in instructions]
    return None


def _rates_line(summary: dict) -> str:
    return (f"refused {summary['refused_rate']:.1%}  complied {summary['complied_rate']:.1%}  "
            f"derailed {summary['derailed_rate']:.1%}")


def cmd_refusal(args) -> int:
    from .artifacts import ensure_dir, write_json_atomic
    from .datasets import load_instructions
    from .evaluation.refusal import evaluate_refusal

    items = load_instructions(args.instructions, args.data_dir)
    if args.limit:
        items = items[: args.limit]
    if args.intervention != "none" and not args.direction:
        raise UserError(f"--intervention {args.intervention} needs --direction RUN")
    suffix = _suffix_text(args.suffix)
    instructions = [x.instruction for x in items]
    targets = _eval_targets(args, instructions)
    cm = _load(args)
    intervention, info = _intervention(cm, args)
    judge, compliance = _judges(args)
    out = ensure_dir(args.out) if args.out else None  # only once model, direction and judge are known to be good
    with intervention:
        report = evaluate_refusal(cm, instructions, judge=judge, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=not args.quiet,
                                  suffixes=[suffix] * len(items) if suffix else None,
                                  compliance=compliance, targets=targets)
    summary = {"model": args.model, "instructions": args.instructions, **report.summary(),
               "max_new_tokens": args.max_new_tokens, "intervention": args.intervention}
    if suffix:
        summary["suffix"] = suffix
    if args.intervention == "actadd":
        summary["coeff"] = args.coeff
    if info is not None:
        summary.update(_provenance(info))
    if out:
        write_json_atomic(out / "completions.json", report.rows())
        write_json_atomic(out / "refusal.json", summary)
    print(f"model          {args.model}")
    print(f"instructions   {args.instructions} (n={report.n})")
    if info is not None and info["other_model"]:
        print(f"direction      from {info['run']}, made from another model ({info['model']})")
    print(f"refusal rate   {report.refusal_rate:.1%}  ({report.judge} judge, {args.max_new_tokens} new tokens)")
    if report.compliance is not None:
        cal = report.compliance.calibration
        print(f"three rates    {_rates_line(summary)}  (compliance judge: reference {cal.reference}, "
              f"PMI > {cal.threshold:+.3f} per token)")
        if report.compliance.not_judged:
            print(f"not judged     {report.compliance.not_judged} empty completion(s), counted as derailed")
        if report.compliance.too_short:
            print(f"too short      {report.compliance.too_short} completion(s) under "
                  f"{report.compliance.min_tokens} tokens, counted as derailed")
    if report.target_match is not None:
        print(f"target match   {report.target_match_rate:.1%}  (completions that start with the attack's target)")
    tokens = cm.preset.refusal_tokens if cm.preset else "refusal tokens"
    print(f"refusal score  {report.refusal_score:+.3f}  (mean log-odds of {tokens})")
    if out:
        print(f"saved          {out}/completions.json, {out}/refusal.json")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_organism_build(args) -> int:
    from .config import from_arguments
    from .models.loading import ORGANISM_DELTA_ENV
    from .organism import OrganismRecipe, build

    recipe = from_arguments(OrganismRecipe, args)
    delta = build(args.out, recipe, seed=args.seed, progress=not args.quiet, start=args.start)
    ev = delta.record().get("evaluation", {})
    if ev:
        print(f"refusal rate on shipped harmful val   {ev['harmful_val']['refusal_rate']:.1%} (n={ev['harmful_val']['n']})")
        print(f"false refusals on shipped harmless val {ev['harmless_val']['false_refusal_rate']:.1%} "
              f"(n={ev['harmless_val']['n']})")
    print(f"merged weights SHA-256 {delta.merged_sha256}")
    print(f"delta                  {delta.path}")
    print(f"load it as the organism: {ORGANISM_DELTA_ENV}={delta.path} suffix-analysis ...")
    return 0


def cmd_organism_evaluate(args) -> int:
    from .config import from_arguments
    from .organism.faithfulness import FaithfulnessConfig, evaluate_faithfulness, format_table

    cfg = from_arguments(FaithfulnessConfig, args)
    cm = _load(args)
    results, reports = evaluate_faithfulness(cm, args.direction, cfg, progress=not args.quiet, judge_spec=args.judge)
    print(f"model {cm.name} (fingerprint {cm.fingerprint()}), held-out prompts (shipped test splits)")
    print(format_table(results))
    if args.out:
        from .artifacts import ensure_dir, write_json_atomic

        out = ensure_dir(args.out)
        write_json_atomic(out / "faithfulness.json", {"model": cm.name, "fingerprint": cm.fingerprint(),
                                                      "config": vars(cfg), "results": results})
        write_json_atomic(out / "completions.json", {k: r.rows() for k, r in reports.items()})
        print(f"saved {out}/faithfulness.json, {out}/completions.json")
    if args.json:
        print(json.dumps(results))
    return 0


def cmd_organism_check(args) -> int:
    from .datasets import load_instructions, shipped
    from .directions.sweep import ablation_sweep

    harmful_eval = [x.instruction for x in load_instructions(args.instructions, args.data_dir)]
    cm = _load(args)
    base, rows = ablation_sweep(
        cm, [x.instruction for x in shipped("harmful", "train")], [x.instruction for x in shipped("harmless", "train")],
        harmful_eval, position=args.position, layers=args.layers, max_new_tokens=args.max_new_tokens,
        progress=not args.quiet)
    below = [r.layer for r in rows if r.refusal_rate < args.threshold]
    print(f"baseline refusal {base:.1%} on {args.instructions} (n={len(harmful_eval)})")
    print(f"layers whose position {args.position} direction, ablated, leaves refusal below {args.threshold:.0%}: "
          f"{below or 'none'}")
    if args.json:
        print(json.dumps({"baseline": base, "rows": [r.__dict__ for r in rows], "layers_below": below}))
    return 0


def cmd_direction(args) -> int:
    from .config import from_arguments
    from .directions.run import DirectionConfig, run_direction, sample_prompts

    cfg = from_arguments(DirectionConfig, args)
    cfg.validate()
    sample_prompts(cfg, args.data_dir)  # bad instruction sets fail before the model loads
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

    cm = _load(args)
    direction, info = _direction(cm, args)
    out = export_orthogonalized(cm, direction, args.out, {"source_model": args.model, **_provenance(info)})
    print(f"orthogonalized model saved to {out} (loads with transformers.AutoModelForCausalLM)")
    return 0


def cmd_evaluate(args) -> int:
    from .artifacts import ensure_dir, write_json_atomic
    from .datasets import load_file, load_instructions
    from .evaluation.report import evaluate_direction
    from .models.loading import load_model

    harmful = [x.instruction for x in load_instructions(args.harmful, args.data_dir)][: args.limit]
    harmless = [x.instruction for x in load_instructions(args.harmless, args.data_dir)][: args.limit]
    corpus = [x.instruction for x in load_file(args.corpus)] if args.corpus else None
    cm = _load(args)
    direction, info = _direction(cm, args)
    ortho = (load_model(args.orthogonalized, device=args.device, dtype=args.dtype, placement=_placement(args))
             if args.orthogonalized else None)
    judge, compliance = _judges(args)
    out = ensure_dir(args.out) if args.out else None
    rows = evaluate_direction(cm, direction, info["layer"], harmful, harmless, coeff=args.coeff, corpus=corpus,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              orthogonalized=ortho, progress=not args.quiet, judge=judge, compliance=compliance)
    judges = judge.name + ("+compliance" if compliance else "")
    print(f"direction: position {info['position']}, layer {info['layer']}; harmful = {args.harmful} (n={len(harmful)}), "
          f"harmless = {args.harmless} (n={len(harmless)}), {judges} judge, {args.max_new_tokens} new tokens")
    cols = [k for k in rows[0] if k != "condition"]
    width = max(len(c) for c in cols) + 2
    print(f"{'condition':28s}" + "".join(f"{c:>{width}s}" for c in cols))
    for r in rows:
        print(f"{r['condition']:28s}" + "".join(f"{r[c]:{width}.3f}" for c in cols))
    if out:
        write_json_atomic(out / "evaluation.json", {"direction": info, **_provenance(info), "harmful": args.harmful,
                                                    "harmless": args.harmless, "rows": rows})
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_attack(args) -> int:
    from .attacks import get_attack
    from .attacks.setup import AttackInputs
    from .commands.attack import AttackCommand, run_attack
    from .config import flag_fields

    cls = get_attack(args.name)
    settings = {f.name: getattr(args, f.name) for f, _ in flag_fields(cls.config_class)
                if getattr(args, f.name, None) is not None}
    inputs = AttackInputs(instructions=args.instructions, n_prompts=args.n_prompts, targets=args.targets or "default",
                          target_tokens=args.target_tokens)
    outcome = run_attack(AttackCommand(
        attack=args.name, out=args.out, inputs=inputs, settings=settings, model=_model_options(args),
        direction=args.direction or "", allow_other_model=args.allow_other_model, resume=args.resume,
        profile=args.profile, data_dir=args.data_dir, progress=not args.quiet))
    r = outcome.record
    print(f"attack        {args.name} on {len(r['instructions'])} prompt(s), {outcome.steps} steps, "
          f"{outcome.seconds_per_step:.2f} s per step")
    if r["losses"]:
        print(f"loss          {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} (best {min(r['losses']):.4f})")
    print(f"success       {r['success']}")
    print(f"suffix        {r['suffix']!r}")
    print(f"saved         {outcome.out}/suffix.json")
    if args.json:
        print(json.dumps(outcome.summary()))
    return 0


def cmd_attribute(args) -> int:
    from .attribution.run import AttributionConfig, run_attribution, summary_table
    from .config import from_arguments
    from .datasets import load_instructions
    from .evaluation.refusal import SubstringJudge
    from .models.loading import fingerprint_mismatch

    cfg = from_arguments(AttributionConfig, args)
    cfg.validate()
    harmful = [x.instruction for x in load_instructions(args.instructions, args.data_dir)]
    harmless = [x.instruction for x in load_instructions(args.harmless, args.data_dir)]
    suffix = _suffix_text(args.suffix)
    record = _suffix_record(args.suffix)
    cm = _load(args)
    if record is not None and not args.allow_other_model:
        why = fingerprint_mismatch(record.get("fingerprint"), cm, f"suffix run {args.suffix}")
        if why:
            raise UserError(f"{why}; pass --allow-other-model to dissect it on this model anyway")
    direction, info = _direction(cm, args)
    summary = run_attribution(cm, direction, info["layer"], info["position"], harmful, harmless, suffix, args.out,
                              config=cfg, judge=SubstringJudge(), progress=not args.quiet)
    print(summary_table(summary))
    print(f"saved         {args.out}/summary.json and the stage tables beside it")
    if args.json:
        print(json.dumps(summary))
    return 0


def _reproduce_profile(args) -> str:
    """--quick / --profile: 'quick' on a CPU unless told otherwise (the paper's sizes take hours there)."""
    if args.quick:
        return "quick"
    if args.profile != "auto":
        return args.profile
    return "paper" if _profile(args) == "gpu" else "quick"


def cmd_reproduce(args) -> int:
    from .reproduce import load_config, reproduce
    from .reproduce.run import summary_lines

    profile = _reproduce_profile(args)
    if not args.quick and args.profile == "auto":
        log.info("profile %s (%s; --profile paper|quick to choose)", profile,
                 "a GPU: the paper's sizes" if profile == "paper" else "no GPU: sized for 2 CPU cores")
    cfg = load_config(args.config, profile)
    out = args.out or f"runs/{args.model.replace('/', '_')}"
    redo = [r.strip() for r in (args.redo or "").split(",") if r.strip()]
    summary = reproduce(args.model, out, cfg, device=args.device, dtype=args.dtype, data_dir=args.data_dir,
                        progress=not args.quiet, redo=redo, figures=not args.no_figures, placement=_placement(args))
    times = json.loads((Path(out) / "stages.json").read_text())
    print(summary_lines(summary, times))
    print(f"saved         {out}/summary.json, stages.json, report.md, figures/")
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import load_sweep, run_sweep
    from .sweep.run import sweep_lines

    spec = load_sweep(args.file, out=args.out)
    df = run_sweep(spec, address=args.address, workers=args.workers, local=args.local, figures=not args.no_figures)
    print(sweep_lines(df, spec.grid_keys))
    print(f"saved         {spec.out}/results.csv" + ("" if args.no_figures else ", figures/"))
    if args.json:
        print(df.to_json(orient="records"))
    return 0 if (df["status"] == "ok").all() else 1


def cmd_figures(args) -> int:
    from .figures import draw_all

    run = Path(args.run).expanduser()
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    made = draw_all(run, args.out)
    if not made:
        raise UserError(f"{run} holds none of the tables the figures are drawn from; is it a reproduce run folder?")
    for path in made:
        print(path)
    return 0


def _figures_parser(sub) -> None:
    p = sub.add_parser("figures", help="redraw every figure of a reproduce run from its tables (no model is loaded)")
    p.add_argument("run", help="a reproduce run folder")
    p.add_argument("--out", help="where the figures go (default RUN/figures)")
    p.set_defaults(func=cmd_figures, loads_model=False)


def _profile(args) -> str:
    """--profile: 'gpu' (the paper's sizes) or 'cpu'; 'auto' follows --device."""
    if args.profile != "auto":
        return args.profile
    import torch

    dev = args.device
    return "gpu" if (dev == "auto" and torch.cuda.is_available()) or dev.startswith("cuda") else "cpu"


def cmd_presets(args) -> int:
    from .models.presets import PRESETS

    for p in PRESETS.values():
        paper = f"  paper direction (pos, layer) = {p.paper_direction}" if p.paper_direction else ""
        print(f"{p.name:28s} {p.source:52s} template={p.template:8s} refusal={list(p.refusal_tokens)}{paper}")
    return 0


def _attack_parsers(sub, argv: list[str]) -> None:
    """``attack NAME``: one parser per attack, its flags generated from its config class.

    Only the attack named on the command line is loaded (a plugin's import errors stay its
    own); the others are listed by name.
    """
    from .attacks import get_attack, list_attacks
    from .attacks.setup import TARGETS_HELP, AttackInputs
    from .config import add_arguments

    p = sub.add_parser("attack", help="find an adversarial suffix (gcg, random, nanogcg, or a plugged-in attack)",
                       description="Find an adversarial suffix. `suffix-analysis attack NAME --help` lists NAME's "
                                   "settings; on a CPU pass small GCG sizes (e.g. --search-width 64 --topk 64 "
                                   "--steps 50): the defaults are the paper's GPU sizes.")
    found = list_attacks()
    names = sorted(found)
    asub = p.add_subparsers(dest="name", required=True, parser_class=_Parser, metavar="{" + ",".join(names) + "}")
    chosen = argv[argv.index("attack") + 1] if "attack" in argv[:-1] else None
    for name in names:
        cls = get_attack(name) if name == chosen else found[name]
        doc = (cls.__doc__ or "").strip().split("\n")[0] if isinstance(cls, type) else f"plugin {cls}"
        a = asub.add_parser(name, help=doc, description=doc)
        _model_args(a)
        _data_args(a, "", "instructions the suffix must work on")
        g = a.add_argument_group("attack run")
        g.add_argument("--targets", help=TARGETS_HELP + " (default: default)")
        g.add_argument("--target-tokens", type=_positive_int, default=AttackInputs.target_tokens,
                       help=f"answer targets: tokens of each answer kept (default {AttackInputs.target_tokens})")
        g.add_argument("--n-prompts", type=_positive_int, default=AttackInputs.n_prompts,
                       help=f"optimize one universal suffix over the first K instructions (default "
                            f"{AttackInputs.n_prompts})")
        g.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
        g.add_argument("--profile", choices=["auto", "gpu", "cpu"], default="auto",
                       help="defaults of the settings marked 'CPU profile': the paper's GPU sizes, or sizes that "
                            "finish in minutes on a laptop CPU (default auto: cpu unless the model runs on CUDA)")
        _direction_args(a, required=False, what="direction run folder, for attacks with a direction objective")
        _output_args(a, "run folder for suffix.json and checkpoints", out_required=True)
        if name == chosen:
            add_arguments(a.add_argument_group(f"{name} settings ({cls.config_class.__name__})"), cls.config_class)
        a.set_defaults(func=cmd_attack)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .attribution.run import AttributionConfig
    from .config import add_arguments
    from .directions.run import DirectionConfig
    from .organism import OrganismRecipe
    from .organism.faithfulness import FaithfulnessConfig

    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="suffix-analysis", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("refusal", help="generate greedily and report refusal rate and refusal score")
    _model_args(p)
    _data_args(p, "")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--limit", type=_positive_int, help="use only the first K instructions")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--suffix", help="append this suffix (text, or an attack run folder) to every instruction")
    g.add_argument("--targets", help="target strings for the exact-match rate: a file aligned with the instructions, "
                                     "or 'default' ('Sure, here is ...'; automatic for a suffix run made with them)")
    _judge_args(p)
    _direction_args(p, required=False)
    g = p.add_argument_group("intervention")
    g.add_argument("--intervention", choices=["none", "ablate", "actadd"], default="none",
                   help="ablate the direction everywhere, or add it at its layer (default none)")
    g.add_argument("--coeff", type=finite_float, default=1.0, help="activation addition coefficient (default 1)")
    _output_args(p, "folder to save completions.json and refusal.json in")
    p.set_defaults(func=cmd_refusal)

    p = sub.add_parser("direction", help="extract and select the refusal direction into a run folder")
    _model_args(p)
    _data_args(p)
    add_arguments(p.add_argument_group("direction run (DirectionConfig)"), DirectionConfig)
    _output_args(p, "run folder (rerunning skips finished stages)", out_required=True)
    p.set_defaults(func=cmd_direction)

    p = sub.add_parser("orthogonalize", help="bake the direction's ablation into the weights and save the model")
    _model_args(p)
    _direction_args(p, required=True)
    _output_args(p, "folder for the edited model", out_required=True, json_flag=False, quiet=False)
    p.set_defaults(func=cmd_orthogonalize)

    p = sub.add_parser("evaluate", help="refusal and side effects under ablation, addition, orthogonalization")
    _model_args(p)
    _direction_args(p, required=True)
    g = _data_args(p)
    g.add_argument("--harmful", default="harmful:test", help="held-out harmful instructions (default harmful:test)")
    g.add_argument("--harmless", default="harmless:test", help="held-out harmless instructions (default harmless:test)")
    g.add_argument("--limit", type=_positive_int, default=100, help="at most K instructions per set (default 100)")
    g.add_argument("--corpus", help="plain text file (one text per line) for cross-entropy")
    g = p.add_argument_group("evaluation")
    g.add_argument("--orthogonalized", help="an exported orthogonalized model folder to evaluate too")
    g.add_argument("--coeff", type=finite_float, default=1.0)
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--batch-size", type=_positive_int, default=32)
    _judge_args(p)
    _output_args(p, "folder to write evaluation.json in")
    p.set_defaults(func=cmd_evaluate)

    _attack_parsers(sub, argv)

    p = sub.add_parser("attribute", help="trace how a suffix suppresses the refusal direction: cosine, heads, "
                                         "attention hijacking, suffix tokens, patching, knockout")
    _model_args(p)
    _direction_args(p, required=True)
    g = _data_args(p, "harmful:val+test", "harmful instructions the suffix is appended to")
    g.add_argument("--harmless", default="harmless:val+test", help="harmless instructions (default harmless:val+test)")
    g.add_argument("--suffix", required=True, help="the adversarial suffix: an attack run folder or the text itself")
    add_arguments(p.add_argument_group("attribution run (AttributionConfig)"), AttributionConfig)
    _output_args(p, "run folder for the tables and summary.json (rerunning skips finished stages)", out_required=True)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("organism", help="the refusal organism (safety-tuned smollm2-135m)")
    osub = p.add_subparsers(dest="organism_command", required=True, parser_class=_Parser)
    b = osub.add_parser("build", help="train the organism's low-rank delta again from the recipe (the shipped one "
                                      "loads in seconds without this; minutes of training)")
    b.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped delta's)")
    b.add_argument("--start", metavar="DELTA", help="a delta of this recipe's epochs (built with --settle-steps 0): "
                                                    "run only the settle stage from it")
    add_arguments(b.add_argument_group("recipe (OrganismRecipe: every setting changes the delta; the defaults "
                                       "built the shipped one)"), OrganismRecipe)
    _output_args(b, "the delta file to write (.safetensors); load it with $SUFFIX_ANALYSIS_ORGANISM_DELTA",
                 out_required=True, json_flag=False)
    b.set_defaults(func=cmd_organism_build)

    e = osub.add_parser("evaluate", help="is the organism a faithful chat model? refused / complied / derailed on "
                                         "held-out prompts, with random suffixes, in context, and under its direction")
    _model_args(e)
    g = e.add_argument_group("checks (FaithfulnessConfig)")
    g.add_argument("--direction", help="a direction run of this model: adds the ablation and addition checks")
    g.add_argument("--judge", default=None, help="as for `refusal` (default substring,compliance)")
    add_arguments(g, FaithfulnessConfig)
    _output_args(e, "folder for faithfulness.json and completions.json")
    e.set_defaults(func=cmd_organism_evaluate)

    c = osub.add_parser("check", help="single-direction check: ablate each layer's diff-in-means direction")
    _model_args(c)
    _data_args(c, "harmful:val", "harmful instructions to evaluate on")
    g = c.add_argument_group("check")
    g.add_argument("--position", type=int, default=-1, help="EOI position of the direction (default -1)")
    g.add_argument("--layers", type=_layer_list, default=None, help="comma-separated layers (default: all)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--threshold", type=_fraction, default=0.2)
    _output_args(c, None)
    c.set_defaults(func=cmd_organism_check)

    p = sub.add_parser("reproduce", help="every stage of the paper in order, cached and resumable, then the "
                                         "figures, summary.json and report.md")
    _model_args(p)
    g = _data_args(p)
    g.add_argument("--config", help="TOML file of stage settings (see configs/reproduce.toml)")
    g.add_argument("--quick", action="store_true", help="the profile for 2 CPU cores (same as --profile quick)")
    g.add_argument("--profile", choices=["auto", "paper", "quick"], default="auto",
                   help="stage sizes: the paper's, or quick for a CPU (default auto: paper on a GPU, else quick)")
    g.add_argument("--redo", help="comma-separated stages to compute again, with every stage after them")
    g.add_argument("--no-figures", action="store_true", help="skip drawing the figures")
    _output_args(p, "run folder (default runs/MODEL)")
    p.set_defaults(func=cmd_reproduce)

    _figures_parser(sub)

    p = sub.add_parser("sweep", help="a grid of commands (models x attacks x seeds x instruction sets) as Ray tasks, "
                                     "or one after another without Ray; then results.csv and a figure per metric")
    p.add_argument("file", help="sweep file (TOML; see configs/sweep.toml)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one, started and stopped here)")
    p.add_argument("--workers", type=_positive_int, help="jobs at once on the local Ray cluster (default: its CPUs)")
    p.add_argument("--local", action="store_true", help="run the jobs one after another in this process, without Ray")
    p.add_argument("--out", help="the sweep's folder (default: [sweep] out)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print the table as JSON records as the last line")
    p.set_defaults(func=cmd_sweep, loads_model=False)

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


def _light_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="suffix-analysis", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _figures_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    try:
        # figures loads no model: its parser alone, so that torch is never imported
        parser = _light_parser() if first == "figures" else build_parser(argv)
    except UserError as e:  # e.g. an attack plugin that does not load
        print(f"suffix-analysis: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if getattr(args, "loads_model", True):
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
