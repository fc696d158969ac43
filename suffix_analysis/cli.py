"""The ``suffix-analysis`` command: each handler parses its flags into the command's config
(:mod:`suffix_analysis.commands`), runs it and prints. The parsers are in :mod:`.cli_parser`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .cli_parser import _light_parser, build_parser
from .errors import UserError

__all__ = ["build_parser", "main"]

log = logging.getLogger("suffix_analysis")


def _model_options(args):
    from .commands.common import ModelOptions
    from .config import from_arguments
    from .models.placement import Placement

    return ModelOptions(model=args.model, preset=args.preset or "", device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, placement=from_arguments(Placement, args))


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _rates_line(summary: dict) -> str:
    return (f"refused {summary['refused_rate']:.1%}  complied {summary['complied_rate']:.1%}  "
            f"derailed {summary['derailed_rate']:.1%}")


def cmd_refusal(args) -> int:
    from .commands.refusal import RefusalCommand, run_refusal
    from .config import from_arguments
    from .defences.suppression import SuppressionConfig
    from .evaluation.compliance import ComplianceConfig

    o = run_refusal(RefusalCommand(
        instructions=args.instructions, out=args.out or "", model=_model_options(args), data_dir=args.data_dir,
        max_new_tokens=args.max_new_tokens, limit=args.limit or 0, batch_size=args.batch_size,
        suffix=args.suffix or "", targets=args.targets or "", judge=args.judge or "",
        compliance=from_arguments(ComplianceConfig, args), direction=args.direction or "",
        allow_other_model=args.allow_other_model, intervention=args.intervention, coeff=args.coeff,
        suppression=from_arguments(SuppressionConfig, args), progress=_progress(args)))
    report, summary, info = o.report, o.record, o.info
    print(f"model          {args.model}")
    print(f"instructions   {args.instructions} (n={report.n})")
    if info is not None and info["other_model"]:
        print(f"direction      from {info['run']}, made from another model ({info['model']})")
    if "suppression" in summary:
        sup = summary["suppression"]
        th = [x for t in sup["thresholds"].values() for x in (t if isinstance(t, list) else [t])]
        print(f"defence        hijacking suppression per {sup['rule']} at {len(sup['thresholds'])} layers, spans of "
              f"{sup['window']}, thresholds {min(th):.3f}..{max(th):.3f}, scale {sup['scale']:g}")
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
    print(f"refusal score  {report.refusal_score:+.3f}  (mean log-odds of {o.refusal_tokens})")
    if o.out:
        print(f"saved          {o.out}/completions.json, {o.out}/refusal.json")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_organism_build(args) -> int:
    from .commands.organism import OrganismBuildCommand, run_organism_build
    from .config import from_arguments
    from .models.materialize import ORGANISM_DELTA_ENV
    from .organism import OrganismRecipe

    o = run_organism_build(OrganismBuildCommand(out=args.out, recipe=from_arguments(OrganismRecipe, args),
                                                seed=args.seed, start=args.start or "", progress=_progress(args)))
    ev = o.evaluation
    if ev:
        print(f"refusal rate on shipped harmful val   {ev['harmful_val']['refusal_rate']:.1%} (n={ev['harmful_val']['n']})")
        print(f"false refusals on shipped harmless val {ev['harmless_val']['false_refusal_rate']:.1%} "
              f"(n={ev['harmless_val']['n']})")
    print(f"merged weights SHA-256 {o.delta.merged_sha256}")
    print(f"delta                  {o.delta.path}")
    print(f"load it as the organism: {ORGANISM_DELTA_ENV}={o.delta.path} suffix-analysis ...")
    return 0


def cmd_organism_evaluate(args) -> int:
    from .commands.organism import OrganismEvaluateCommand, run_organism_evaluate
    from .config import from_arguments
    from .organism.faithfulness import FaithfulnessConfig, format_table

    o = run_organism_evaluate(OrganismEvaluateCommand(
        out=args.out or "", model=_model_options(args), direction=args.direction or "", judge=args.judge or "",
        config=from_arguments(FaithfulnessConfig, args), progress=_progress(args)))
    print(f"model {o.model} (fingerprint {o.fingerprint}), held-out prompts (shipped test splits)")
    print(format_table(o.results))
    if o.out:
        print(f"saved {o.out}/faithfulness.json, {o.out}/completions.json")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_organism_check(args) -> int:
    from .commands.organism import OrganismCheckCommand, run_organism_check

    o = run_organism_check(OrganismCheckCommand(
        model=_model_options(args), instructions=args.instructions, data_dir=args.data_dir, position=args.position,
        layers=args.layers, max_new_tokens=args.max_new_tokens, threshold=args.threshold, progress=_progress(args)))
    print(f"baseline refusal {o.baseline:.1%} on {args.instructions} (n={o.n})")
    print(f"layers whose position {args.position} direction, ablated, leaves refusal below {args.threshold:.0%}: "
          f"{o.layers_below or 'none'}")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_direction(args) -> int:
    from .commands.direction import DirectionCommand, run_direction_command
    from .config import from_arguments
    from .directions.run import DirectionConfig

    o = run_direction_command(DirectionCommand(out=args.out, model=_model_options(args),
                                               config=from_arguments(DirectionConfig, args), data_dir=args.data_dir,
                                               progress=_progress(args)))
    info = o.info
    print(f"selected direction  position {info['position']}, layer {info['layer']} of {o.n_layers}")
    print(f"bypass score        {info['bypass']:+.3f}   (mean refusal score on harmful val, ablated)")
    print(f"induce score        {info['induce']:+.3f}   (mean refusal score on harmless val, added)")
    print(f"KL                  {info['kl']:.4f}    (first token, harmless val, ablated vs clean)")
    print(f"saved               {args.out}/direction.safetensors, direction.json, candidates.csv")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def _direction_run_command(command_cls, config_cls, args):
    """A command that starts from a direction run (``rdo``, ``edit``) from its parsed flags;
    its ``settings`` are the ``config_cls`` flags given."""
    from .config import given_arguments

    return command_cls(direction=args.direction, out=args.out, model=_model_options(args),
                       settings=given_arguments(config_cls, args), profile=args.profile, data_dir=args.data_dir,
                       progress=_progress(args))


def cmd_rdo(args) -> int:
    from .commands.rdo import RDOCommand, run_rdo_command
    from .directions.rdo import RDOConfig

    o = run_rdo_command(_direction_run_command(RDOCommand, RDOConfig, args))
    info, start = o.info, o.info["start"]
    print(f"RDO direction       position {info['position']}, layer {info['layer']}, {info['steps']} steps; cosine "
          f"{info['cosine_to_start']:.3f} to the start")
    print(f"                    RDO       difference in means (val prompts of {start['run']})")
    print(f"bypass score        {info['bypass']:+8.3f}  {start['bypass']:+8.3f}   (mean refusal score, harmful, ablated)")
    print(f"induce score        {info['induce']:+8.3f}  {start['induce']:+8.3f}   (mean refusal score, harmless, added)")
    print(f"KL                  {info['kl']:8.4f}  {start['kl']:8.4f}   (first token, harmless, ablated vs clean)")
    if info.get("cone_dim", 1) > 1:
        cone = json.loads((Path(args.out) / "cone.json").read_text())
        print(f"cone                {info['cone_dim']} dimensions; checks on {cone['prompts']['harmful']} and "
              f"{cone['prompts']['harmless']} (refusing: refusal score > 0)")
        for r in cone["vectors"]:
            induced = f"{r['refusing_added']:6.1%} of harmless induced" if "refusing_added" in r else ""
            print(f"  {r['vector']:16s}  ablated: {1 - r['refusing_ablated']:6.1%} of harmful bypassed, KL "
                  f"{r['kl']:.3f}   added: {induced}")
    print(f"saved               {args.out}/direction.safetensors, direction.json, losses.csv"
          f"{', cone.safetensors, cone.json' if info.get('cone_dim', 1) > 1 else ''} (--direction {args.out} "
          "works wherever a direction run does)")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_edit(args) -> int:
    from .commands.edit import EditCommand, run_edit_command
    from .edits.pareto import ParetoConfig

    o = run_edit_command(_direction_run_command(EditCommand, ParetoConfig, args))
    info, c, paper = o.info, o.info["chosen"], o.info["paper_edit"]
    print(f"Pareto edit         trial {c['trial']} of {info['budget']['trials']} ({info['budget']['seconds']:.0f} s), "
          f"{info['front']} trials on the front")
    sel = info["prompts"]
    print(f"                    chosen    paper's edit (every share 1)   ({sel['n_harmful']} harmful and "
          f"{sel['n_harmless']} harmless selection prompts)")
    if paper:
        print(f"harmful refused     {c['refused']:8.1%}  {paper['refused']:8.1%}   (refusal score > 0)")
        print(f"KL                  {c['kl']:8.4f}  {paper['kl']:8.4f}   (first token, harmless, edited vs clean)")
    p = info["profile"]
    for name in ("attn", "mlp"):
        t = p[name]
        print(f"{name + ' profile':20s}max {t['max_weight']:.2f} at layer {t['peak']:.1f}, min {t['min_weight']:.2f} "
              f"at {t['distance']:.1f} layers away")
    print(f"embeddings          share {p['embed']:.2f}")
    print(f"saved               {args.out}/edit.json, trials.csv, front.csv, pareto.png"
          + (f"; the edited model in {info['model_folder']}" if info.get("model_folder") else ""))
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_orthogonalize(args) -> int:
    from .commands.orthogonalize import OrthogonalizeCommand, run_orthogonalize

    o = run_orthogonalize(OrthogonalizeCommand(direction=args.direction, out=args.out, model=_model_options(args),
                                               allow_other_model=args.allow_other_model, cone=args.cone,
                                               preserve_norms=args.preserve_norms,
                                               progress=_progress(args)))
    print(f"orthogonalized model saved to {o.out} (loads with transformers.AutoModelForCausalLM)")
    return 0


def cmd_evaluate(args) -> int:
    from .commands.evaluate import EvaluateCommand, run_evaluate
    from .config import from_arguments
    from .defences.suppression import SuppressionConfig
    from .evaluation.compliance import ComplianceConfig

    o = run_evaluate(EvaluateCommand(
        direction=args.direction, out=args.out or "", model=_model_options(args),
        allow_other_model=args.allow_other_model, harmful=args.harmful, harmless=args.harmless, limit=args.limit,
        corpus=args.corpus or "", data_dir=args.data_dir, orthogonalized=args.orthogonalized or "", suppress=args.suppress,
        suppression=from_arguments(SuppressionConfig, args),
        coeff=args.coeff, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge=args.judge or "",
        compliance=from_arguments(ComplianceConfig, args), progress=_progress(args)))
    info, rows = o.info, o.rows
    print(f"direction: position {info['position']}, layer {info['layer']}; harmful = {args.harmful} "
          f"(n={o.n_harmful}), harmless = {args.harmless} (n={o.n_harmless}), {o.judges} judge, "
          f"{args.max_new_tokens} new tokens")
    cols = [k for k in rows[0] if k != "condition"]
    width = max(len(c) for c in cols) + 2
    print(f"{'condition':28s}" + "".join(f"{c:>{width}s}" for c in cols))
    for r in rows:
        print(f"{r['condition']:28s}" + "".join(f"{r[c]:{width}.3f}" for c in cols))
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_attack(args) -> int:
    from .attacks import get_attack
    from .attacks.setup import AttackInputs
    from .commands.attack import AttackCommand, run_attack
    from .config import given_arguments

    cls = get_attack(args.name)
    settings = given_arguments(cls.config_class, args)
    inputs = AttackInputs(instructions=args.instructions, n_prompts=args.n_prompts, targets=args.targets or "default",
                          target_tokens=args.target_tokens)
    outcome = run_attack(AttackCommand(
        attack=args.name, out=args.out, inputs=inputs, settings=settings, model=_model_options(args),
        direction=args.direction or "", allow_other_model=args.allow_other_model, resume=args.resume,
        profile=args.profile, data_dir=args.data_dir, progress=_progress(args)))
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
    from .attribution.run import AttributionConfig, summary_table
    from .commands.attribute import AttributeCommand, run_attribute
    from .config import from_arguments

    o = run_attribute(AttributeCommand(
        direction=args.direction, suffix=args.suffix, out=args.out, model=_model_options(args),
        allow_other_model=args.allow_other_model, instructions=args.instructions, harmless=args.harmless,
        data_dir=args.data_dir, config=from_arguments(AttributionConfig, args), progress=_progress(args)))
    print(summary_table(o.record))
    print(f"saved         {args.out}/summary.json and the stage tables beside it")
    if args.json:
        print(json.dumps(o.summary()))
    return 0


def cmd_reproduce(args) -> int:
    from .commands.reproduce import ReproduceCommand, run_reproduce
    from .reproduce.run import summary_lines

    o = run_reproduce(ReproduceCommand(
        out=args.out or "", model=_model_options(args), config=args.config or "", quick=args.quick,
        profile=args.profile, redo=args.redo or "", figures=not args.no_figures, data_dir=args.data_dir,
        progress=_progress(args)))
    print(summary_lines(o.record, o.times))
    print(f"saved         {o.out}/summary.json, stages.json, report.md, figures/")
    if args.json:
        print(json.dumps(o.summary()))
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


def cmd_presets(args) -> int:
    from .models.presets import PRESETS

    for p in PRESETS.values():
        paper = f"  paper direction (pos, layer) = {p.paper_direction}" if p.paper_direction else ""
        print(f"{p.name:28s} {p.source:52s} template={p.template:8s} refusal={list(p.refusal_tokens)}{paper}")
    return 0


HANDLERS = {"refusal": cmd_refusal, "direction": cmd_direction, "rdo": cmd_rdo, "edit": cmd_edit,
            "orthogonalize": cmd_orthogonalize, "evaluate": cmd_evaluate, "attack": cmd_attack, "attribute": cmd_attribute,
            "organism build": cmd_organism_build, "organism evaluate": cmd_organism_evaluate,
            "organism check": cmd_organism_check, "reproduce": cmd_reproduce, "figures": cmd_figures,
            "sweep": cmd_sweep, "presets": cmd_presets}


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
        from .commands import quiet_libraries

        quiet_libraries()
    handler = HANDLERS[" ".join(filter(None, [args.command, getattr(args, "organism_command", None)]))]
    try:
        return handler(args)
    except UserError as e:
        print(f"suffix-analysis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("suffix-analysis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
