"""The ``suffix-analysis`` command line: its parsers (flags, defaults, help).

Each parser names its command in ``command`` (and ``name`` for ``attack NAME``,
``organism_command`` for ``organism ...``); :mod:`suffix_analysis.cli` parses the flags into
the command's config (:mod:`suffix_analysis.commands`), runs it and prints.
"""

from __future__ import annotations

import argparse
import sys

from .config import finite_float

DESCRIPTION = "The ``suffix-analysis`` command."


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


def _model_args(p: argparse.ArgumentParser) -> None:
    from .commands.common import REFUSING_MODEL as default
    from .config import add_arguments
    from .models.placement import Placement

    g = p.add_argument_group("model")
    g.add_argument("--model", default=default,
                   help=f"preset name, Hugging Face id, model folder or .gguf file (default: {default})")
    g.add_argument("--preset", help="preset that supplies template and refusal tokens for a folder or HF id")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (Qwen-1)")
    add_arguments(p.add_argument_group("placement over devices (accelerate, bitsandbytes)"), Placement)


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


def _figures_parser(sub) -> None:
    p = sub.add_parser("figures", help="redraw every figure of a reproduce run from its tables (no model is loaded)")
    p.add_argument("run", help="a reproduce run folder")
    p.add_argument("--out", help="where the figures go (default RUN/figures)")
    p.set_defaults(loads_model=False)


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


def _direction_run_parser(sub, name: str, help: str, direction_help: str, gpu_sizes: str, group: str, config_cls,
                          out_help: str) -> None:
    """A command that starts from a direction run and writes a run folder, its sizes by
    profile (``rdo``, ``edit``): model, data, ``--direction``, ``--profile``, the config's
    flags, output."""
    from .config import add_arguments

    p = sub.add_parser(name, help=help)
    _model_args(p)
    _data_args(p)
    p.add_argument_group("direction").add_argument("--direction", required=True, help=direction_help)
    p.add_argument("--profile", choices=["auto", "gpu", "cpu"], default="auto",
                   help=f"default sizes: {gpu_sizes} (gpu) or CPU-sized (cpu); auto follows the device")
    add_arguments(p.add_argument_group(group), config_cls)
    _output_args(p, out_help, out_required=True)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .attribution.run import AttributionConfig
    from .config import add_arguments
    from .defences.suppression import SuppressionConfig
    from .directions.rdo import RDOConfig
    from .directions.run import DirectionConfig
    from .edits.pareto import ParetoConfig
    from .organism import OrganismRecipe
    from .organism.faithfulness import FaithfulnessConfig

    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="suffix-analysis", description=DESCRIPTION)
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
    g.add_argument("--intervention", choices=["none", "ablate", "actadd", "suppress"], default="none",
                   help="ablate the direction everywhere, add it at its layer, or suppress attention hijacking "
                        "(the defence; its layers follow the direction's) (default none)")
    g.add_argument("--coeff", type=finite_float, default=1.0, help="activation addition coefficient (default 1)")
    add_arguments(p.add_argument_group("hijacking suppression (--intervention suppress; SuppressionConfig)"),
                  SuppressionConfig)
    _output_args(p, "folder to save completions.json and refusal.json in")

    p = sub.add_parser("direction", help="extract and select the refusal direction into a run folder")
    _model_args(p)
    _data_args(p)
    add_arguments(p.add_argument_group("direction run (DirectionConfig)"), DirectionConfig)
    _output_args(p, "run folder (rerunning skips finished stages)", out_required=True)

    _direction_run_parser(
        sub, "rdo", "learn a refusal direction by gradient (RDO), starting from a direction run",
        "the direction run RDO starts from (its direction, layer and prompts; from `suffix-analysis direction`)",
        "the paper's", "RDO (RDOConfig)", RDOConfig, "RDO run folder (rerunning resumes)")
    _direction_run_parser(
        sub, "edit", "the Pareto edit: search a per-layer weight profile for the orthogonalization (refusals vs KL, "
                     "Optuna) and export the chosen edit",
        "the direction (or RDO) run whose direction is edited out; its val prompts score the trials",
        "heretic's", "Pareto edit (ParetoConfig)", ParetoConfig,
        "edit run folder (rerunning resumes; more --trials extend the search)")

    p = sub.add_parser("orthogonalize", help="bake the direction's ablation into the weights and save the model")
    _model_args(p)
    _direction_args(p, required=True)
    p.add_argument("--cone", action="store_true", help="orthogonalize the whole refusal cone of an RDO run "
                                                        "(`rdo --cone-dim K`), not its direction")
    p.add_argument("--preserve-norms", action="store_true",
                   help="the norm-preserving edit: each attention and MLP output matrix keeps its row norms "
                        "(heretic's row normalization, computed exactly)")
    _output_args(p, "folder for the edited model", out_required=True, json_flag=False, quiet=False)

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
    g.add_argument("--suppress", action="store_true", help="also evaluate hijacking suppression (the defence): "
                                                           "its cost on harmless prompts")
    add_arguments(p.add_argument_group("hijacking suppression (--suppress; SuppressionConfig)"), SuppressionConfig)
    _judge_args(p)
    _output_args(p, "folder to write evaluation.json in")

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

    e = osub.add_parser("evaluate", help="is the organism a faithful chat model? refused / complied / derailed on "
                                         "held-out prompts, with random suffixes, in context, and under its direction")
    _model_args(e)
    g = e.add_argument_group("checks (FaithfulnessConfig)")
    g.add_argument("--direction", help="a direction run of this model: adds the ablation and addition checks")
    g.add_argument("--judge", default=None, help="as for `refusal` (default substring,compliance)")
    add_arguments(g, FaithfulnessConfig)
    _output_args(e, "folder for faithfulness.json and completions.json")

    c = osub.add_parser("check", help="single-direction check: ablate each layer's diff-in-means direction")
    _model_args(c)
    _data_args(c, "harmful:val", "harmful instructions to evaluate on")
    g = c.add_argument_group("check")
    g.add_argument("--position", type=int, default=-1, help="EOI position of the direction (default -1)")
    g.add_argument("--layers", type=_layer_list, default=None, help="comma-separated layers (default: all)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--threshold", type=_fraction, default=0.2)
    _output_args(c, None)

    p = sub.add_parser("reproduce", help="every stage of the paper in order, cached and resumable, then the "
                                         "figures, summary.json and report.md")
    _model_args(p)
    g = _data_args(p)
    g.add_argument("--config", help="TOML file of stage settings (see configs/reproduce.toml)")
    g.add_argument("--quick", action="store_true", help="the profile for 2 CPU cores (same as --profile cpu)")
    g.add_argument("--profile", choices=["auto", "gpu", "cpu", "paper", "quick"], default="auto",
                   help="stage sizes, the same words as the attacks': gpu (the paper's) or cpu (minutes on 2 cores); "
                        "default auto: gpu on a GPU, else cpu (paper and quick: the earlier names)")
    g.add_argument("--redo", help="comma-separated stages to compute again, with every stage after them")
    g.add_argument("--no-figures", action="store_true", help="skip drawing the figures")
    _output_args(p, "run folder (default runs/MODEL)")

    _figures_parser(sub)

    p = sub.add_parser("sweep", help="a grid of one command's settings (models x seeds x instruction sets...) as Ray tasks, "
                                     "or one after another without Ray; then results.csv and a figure per metric")
    p.add_argument("file", help="sweep file (TOML; see configs/sweep.toml)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one, started and stopped here)")
    p.add_argument("--workers", type=_positive_int, help="jobs at once on the local Ray cluster (default: its CPUs)")
    p.add_argument("--local", action="store_true", help="run the jobs one after another in this process, without Ray")
    p.add_argument("--out", help="the sweep's folder (default: [sweep] out)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="print the table as JSON records as the last line")
    p.set_defaults(loads_model=False)

    sub.add_parser("presets", help="list the model presets")
    return parser


def _light_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="suffix-analysis", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _figures_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser
