"""Every setting of ``reproduce``, one TOML section per stage.

Defaults follow the paper (128 train and 32 val instructions per class, greedy decoding,
100 held-out harmful instructions, a 20-token universal suffix, GCG at search width 512 x
250 steps): the ``gpu`` profile. The ``cpu`` profile sizes each stage for 2 CPU cores (the
same two words as the attacks' profiles). Precedence, lowest
first: the dataclass defaults, the profile, the TOML file, the command line.

    [run]          what is evaluated and how it is judged      (RunSettings)
    [direction]    extraction and selection                     (directions.run.DirectionConfig)
    [evaluation]   ablation / addition / orthogonalization       (EvaluationSettings)
    [attack]       the universal suffix and its control          (AttackSettings + attacks.gcg.GCGConfig)
    [attribution]  how the suffix suppresses the direction       (AttributionSettings + attribution.run.AttributionConfig)
    [defence]      hijacking suppression against the suffix       (DefenceSettings + defences.suppression.SuppressionConfig)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks.gcg import GCGConfig
from ..attacks.setup import AttackInputs
from ..attribution.run import AttributionConfig
from ..config import PROFILES, read_toml, setting, toml_value  # gpu: the paper's sizes; cpu: 2 cores
from ..defences.suppression import SuppressionConfig
from ..directions.run import DirectionConfig
from ..errors import UserError

# Earlier names of the two profiles, still read from old run folders and scripts.
PROFILE_ALIASES = {"paper": "gpu", "quick": "cpu"}


@dataclass
class RunSettings:
    """The evaluation set every stage reports on, and its judges."""

    # Held out from everything: instructions a direction run or the attack used are removed.
    harmful_eval: str = setting("harmful:val+test", "harmful instructions the rates are measured on (e.g. "
                                                    "jailbreakbench with --data-dir)")
    harmless_eval: str = setting("harmless:test", "harmless instructions (false and induced refusals)")
    n_eval: int = setting(100, "instructions per evaluation set (JailbreakBench's 100)")
    max_new_tokens: int = setting(64, "greedy tokens per judged completion")
    judge: str = setting("", "judges, as refusal --judge (empty: substring, plus compliance where its reference "
                             "model is available offline)")
    batch_size: int = setting(16, "prompts per generation batch")
    judge_harmless: bool = setting(True, "also judge the harmless completions for compliance (a calibration and "
                                         "four judge passes more)")


@dataclass
class EvaluationSettings:
    """The paper's interventions, judged on the evaluation set."""

    coeff: float = setting(1.0, "activation addition: multiple of the direction added at its layer")
    orthogonalize: bool = setting(True, "export the orthogonalized model (weights without the direction) and "
                                        "evaluate it")
    corpus: str = setting("", "text file (one document per line) for the cross-entropy column (empty: none)")


@dataclass
class AttackSettings(AttackInputs):
    """What the universal suffix is optimized on (the GCG settings sit beside these): the
    attack command's inputs, over 20 prompts, and the random control's seed."""

    n_prompts: int = setting(20, "optimize one universal suffix over the first N instructions")
    random_seed: int = setting(0, "seed of the random-suffix control (same token length)")


@dataclass
class AttributionSettings:
    """Attribution runs on the first ``n_prompts`` of each evaluation set."""

    enabled: bool = setting(True, "run the attribution stage")


@dataclass
class DefenceSettings:
    """Hijacking suppression, calibrated on clean train prompts, against the attack's suffixes
    on the evaluation set (``defences/suppression.py``)."""

    enabled: bool = setting(True, "run the defence stage")


# TOML section -> the ReproduceConfig fields it fills (two where a section feeds two config classes).
SECTIONS: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "direction": ("direction",),
    "evaluation": ("evaluation",),
    "attack": ("attack", "gcg"),
    "attribution": ("attribution", "attribution_config"),
    "defence": ("defence", "suppression"),
}

# The 2-core CPU profile: each stage in minutes (measured in benchmarks/ and docs/reproduce.md).
CPU: dict[str, dict] = {
    "run": {"n_eval": 32, "max_new_tokens": 32, "judge_harmless": False},
    "direction": {"n_train": 32, "n_val": 8, "last_positions": 1},
    # The paper's objective (the "Sure, here is" target) leaves the organism refusing at CPU
    # sizes; its own ablated answers as targets, with the direction term floored at the
    # harmless level, stop the refusals (docs/guides/suffixes.md).
    "attack": {"n_prompts": 5, "search_width": 32, "topk": 32, "num_steps": 20, "progressive": False,
               "objective": "target+direction", "targets": "ablated"},
    "attribution": {"n_prompts": 8, "n_random": 1, "patch_ks": "1,4,8", "bands": 0, "max_new_tokens": 32},
}
PROFILE_VALUES = {"gpu": {}, "cpu": CPU}


@dataclass
class ReproduceConfig:
    """One object per TOML section (two where a section feeds two config classes)."""

    run: RunSettings = field(default_factory=RunSettings)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    gcg: GCGConfig = field(default_factory=GCGConfig)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    attribution_config: AttributionConfig = field(default_factory=AttributionConfig)
    defence: DefenceSettings = field(default_factory=DefenceSettings)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    profile: str = "gpu"

    def validate(self) -> None:
        if self.run.n_eval < 1 or self.run.max_new_tokens < 1 or self.run.batch_size < 1:
            raise UserError("[run] n_eval, max_new_tokens and batch_size must be at least 1")
        try:
            self.attack.validate()
        except UserError as e:
            raise UserError(f"[attack] {e}") from None
        self.direction.validate()
        self.gcg.validate()
        self.attribution_config.validate()
        self.suppression.validate()

    def sections(self) -> dict[str, dict]:
        """Every setting by TOML section, as plain values (what ``config.toml`` holds)."""
        return {name: {k: v for f in fields for k, v in dataclasses.asdict(getattr(self, f)).items()}
                for name, fields in SECTIONS.items()}


def section_classes(section: str) -> list[type]:
    """The config classes whose fields TOML section ``section`` holds."""
    factory = {f.name: f.default_factory for f in dataclasses.fields(ReproduceConfig)}
    return [factory[f] for f in SECTIONS[section]]


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build_config(profile: str = "gpu", sections: dict | None = None, source: str = "settings") -> ReproduceConfig:
    """A validated config: ``profile``'s values, then ``sections`` (``{section: {key: value}}``)."""
    profile = PROFILE_ALIASES.get(profile, profile)
    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}'; use {', '.join(PROFILES)}")
    merged: dict[str, dict] = {name: dict(PROFILE_VALUES[profile].get(name, {})) for name in SECTIONS}
    for name, values in (sections or {}).items():
        if name not in SECTIONS:
            near = difflib.get_close_matches(name, list(SECTIONS), n=1)
            hint = f"did you mean [{near[0]}]? " if near else ""
            raise UserError(f"{source}: unknown section [{name}]; {hint}sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{name}] must be a table of settings")
        merged[name].update(values)
    made: dict[str, object] = {}
    for name, attrs in SECTIONS.items():
        values = dict(merged[name])
        classes = section_classes(name)
        for attr, cls in zip(attrs, classes):
            fields = _fields(cls)
            mine = {k: toml_value(name, k, values.pop(k), cls) for k in list(values) if k in fields}
            made[attr] = cls(**mine)
        if values:
            known = sorted(k for cls in classes for k in _fields(cls))
            bad = sorted(values)[0]
            near = difflib.get_close_matches(bad, known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UserError(f"{source}: unknown key {bad} in [{name}]; {hint}known: {', '.join(known)}")
    cfg = ReproduceConfig(**made, profile=profile)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, profile: str = "gpu") -> ReproduceConfig:
    """The config of ``path`` (a TOML file; none: the defaults) over ``profile``."""
    return build_config(profile, read_toml(path) if path else None, source=str(path) if path else "settings")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no TOML form for {v!r}")


def _helps(section: str) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for cls in section_classes(section) for f in dataclasses.fields(cls)}


def to_toml(cfg: ReproduceConfig, comments: bool = False) -> str:
    """Every setting of ``cfg`` as TOML that :func:`load_config` reads back to the same config
    (with ``comments``, each setting's help above it: the documented example file)."""
    lines = [f"# suffix-analysis reproduce settings (profile {cfg.profile}, every value resolved)"]
    for name, values in cfg.sections().items():
        helps = _helps(name)
        lines += ["", f"[{name}]"]
        for k, v in values.items():
            if comments and helps.get(k):
                lines.append(f"# {helps[k]}")
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
