"""``RUN/report.md``: the headline numbers beside the paper's, the figures, the fingerprints,
the package versions and the commands that reproduce the run."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from ..artifacts import write_text_atomic
from ..figures import FIGURES
from .config import ReproduceConfig

# The headline numbers of a run, in the order the report and the console show them.
HEADLINES = (
    ("refusal_baseline", "refused, no intervention"),
    ("refusal_ablated", "refused, direction ablated"),
    ("refusal_orthogonalized", "refused, orthogonalized weights"),
    ("induced_refusal_actadd", "harmless refused, direction added"),
    ("refusal_adversarial_suffix", "refused, adversarial suffix"),
    ("refusal_random_suffix", "refused, random suffix"),
    ("complied_adversarial_suffix", "complied, adversarial suffix"),
    ("complied_random_suffix", "complied, random suffix"),
)


# What the papers report, for orientation (their models, not this one): Arditi et al. 2024
# (Fig. 1: ablation and orthogonalization remove refusal, activation addition induces it;
# Section 5 on Qwen-1.8B-Chat and one 20-token GCG suffix) and Ben-Tov et al. 2025.
PAPER = {
    "refusal_ablated": "close to 0 for every model (Fig. 1)",
    "refusal_orthogonalized": "close to the ablated rate (Fig. 1)",
    "induced_refusal_actadd": "close to 1 on harmless instructions",
    "refusal_adversarial_suffix": "low: the suffix jailbreaks",
    "refusal_random_suffix": "about the baseline",
    "cosine": "about 0.45 harmful -> about 0.1 with the suffix (harmless level); random barely moves it",
    "top8_projection": "about 5.0 -> 0.5 with the suffix (random: about 3.5)",
    "top8_attention": "instruction:suffix about 5:1 -> 0.5:3.5",
    "knockout_restored": "knockout of suffix -> template attention flips almost every attack back",
    "defence": "suppression at least halves attack success at a small utility cost (Ben-Tov et al.)",
}
PACKAGES = ("suffix-analysis", "torch", "transformers", "transformer-lens", "pandas", "seaborn", "matplotlib")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _f(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_report(out: Path, summary: dict, times: dict, config: ReproduceConfig) -> Path:

    out = Path(out)
    run = json.loads((out / "run.json").read_text())
    lines = [f"# Reproduction: {summary['model']}", "",
             f"Profile `{config.profile}`; evaluation on {summary['n_eval_harmful']} harmful "
             f"(`{config.run.harmful_eval}`) and {summary['n_eval_harmless']} harmless (`{config.run.harmless_eval}`) "
             "instructions that no direction sample and no attack prompt used.", ""]
    if "layer" in summary:
        lines += [f"Direction: `blocks.{summary['layer']}.hook_resid_pre`, EOI position {summary['position']} "
                  f"(bypass {summary['bypass']:+.2f}, induce {summary['induce']:+.2f}, KL {summary['kl']:.3f}).", ""]
    lines += ["## Headline numbers", "", "| measure | this run | paper (their models) |", "|---|---|---|"]
    lines += [f"| {label} | {_f(summary.get(key))} | {PAPER.get(key, '')} |" for key, label in HEADLINES]
    for key in ("complied_baseline", "complied_ablated", "derailed_adversarial_suffix", "derailed_random_suffix"):
        if key in summary:
            lines.append(f"| {key.replace('_', ' ')} | {_f(summary[key])} | |")
    att = summary.get("attribution")
    if att:
        lines += [f"| cosine with the direction (harmful / +random / +adversarial / harmless) | "
                  f"{' / '.join(_f(att['cosine'].get(k)) for k in ('harmful', 'random', 'adversarial', 'harmless'))} "
                  f"| {PAPER['cosine']} |",
                  f"| top-8 heads' projection (harmful / +random / +adversarial) | "
                  f"{' / '.join(_f(att['top8_projection'].get(k)) for k in ('harmful', 'random', 'adversarial'))} "
                  f"| {PAPER['top8_projection']} |"]
        a = att.get("top8_attention", {})
        if "adversarial" in a:
            lines.append(f"| top-8 attention instruction:suffix (harmful -> adversarial) | "
                         f"{_f(a['harmful'].get('instruction'))}:{_f(a['harmful'].get('suffix'))} -> "
                         f"{_f(a['adversarial'].get('instruction'))}:{_f(a['adversarial'].get('suffix'))} | "
                         f"{PAPER['top8_attention']} |")
        lines.append(f"| knockout restores refusal (generated answers) | {_f(att.get('knockout_restored'))} | "
                     f"{PAPER['knockout_restored']} |")
    if "defence_refused_adversarial_suffix_defended" in summary:
        for kind in ("adversarial", "random"):
            lines.append(f"| {kind} suffix, refused / complied: undefended -> hijacking suppression | "
                         f"{_f(summary[f'defence_refused_{kind}_suffix'])} / "
                         f"{_f(summary[f'defence_complied_{kind}_suffix'])} -> "
                         f"{_f(summary[f'defence_refused_{kind}_suffix_defended'])} / "
                         f"{_f(summary[f'defence_complied_{kind}_suffix_defended'])} | |")
        lines.append(f"| hijacking suppression on harmless: false refusals, first-token KL | "
                     f"{_f(summary['defence_false_refusal_undefended'])} -> {_f(summary['defence_false_refusal'])}, "
                     f"{_f(summary['defence_kl_harmless'])} | {PAPER['defence']} |")
    if summary.get("suffix"):
        lines += ["", f"Adversarial suffix: `{summary['suffix']}`", f"Random control: `{summary.get('random_suffix')}`"]
    lines += ["", "Read the completions behind every rate (`transfer/completions_*.json`): a suffix that stops "
              "refusals by derailing the answer is counted as derailed, not complied, only when the compliance "
              "judge ran.", "", "## Figures", ""]
    for name, fn in FIGURES:
        if (out / "figures" / f"{name}.png").is_file():
            lines += [f"### {fn.__doc__.split(chr(10))[0]}", "", f"![{name}](figures/{name}.png)", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', '')} |" for k, v in times.items()]
    lines += ["", "## Provenance", "", f"- model `{summary['model']}`, weights fingerprint `{summary['fingerprint']}`",
              f"- evaluation sets hash `{run['eval']['hash']}` (`eval_sets.json`)",
              "- settings: `config.toml` (every value resolved)"]
    lines += [f"- {k} {v}" for k, v in _versions().items()]
    lines += ["", "## Reproduce", "", "```bash",
              f"suffix-analysis reproduce --model {summary['model']} --out {out} --config {out}/config.toml "
              f"--profile {config.profile}",
              f"suffix-analysis figures {out}   # redraw the figures from the tables, without a model", "```", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))
