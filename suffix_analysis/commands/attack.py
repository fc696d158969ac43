"""``attack NAME``: find an adversarial suffix and write ``OUT/suffix.json``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import write_json_atomic
from ..attacks import AttackConfig, get_attack
from ..attacks.setup import AttackInputs, attack_instructions, attack_targets, build_attack
from ..errors import UserError
from ..runs import RUN_FILE, open_run
from .common import ModelOptions, device_profile, direction_of, profiled_config, provenance

log = logging.getLogger(__name__)


@dataclass
class AttackCommand:
    """One attack run. ``config``: the attack's own settings (an instance of its config class),
    or ``settings`` given by name over the profile's defaults."""

    attack: str
    out: str
    inputs: AttackInputs = field(default_factory=AttackInputs)
    config: AttackConfig | None = None
    settings: dict = field(default_factory=dict)
    model: ModelOptions = field(default_factory=ModelOptions)
    direction: str = ""  # a direction run folder, for attacks with a direction objective or 'ablated' targets
    allow_other_model: bool = False
    resume: bool = False
    profile: str = "auto"  # 'gpu', 'cpu' or 'auto' (follows the device)
    data_dir: str | None = None
    progress: bool = True


@dataclass
class AttackOutcome:
    """What ``run_attack`` found; ``record`` is ``OUT/suffix.json``."""

    out: str
    record: dict
    steps: int
    seconds_per_step: float

    def summary(self) -> dict:
        """The one-line JSON summary (``--json``; a sweep's result row)."""
        r = self.record
        return {k: r[k] for k in ("suffix", "suffix_ids", "success", "attack", "model")} | {
            "steps": self.steps, "final_loss": r["losses"][-1] if r["losses"] else None}


def attack_config(cmd: AttackCommand) -> tuple[AttackConfig, str]:
    """The attack's config (validated) and the device profile whose defaults it took."""
    cls = get_attack(cmd.attack)
    profile = device_profile(cmd.profile, cmd.model)
    if cmd.config is None:
        return profiled_config(cls.config_class, profile, cmd.settings, f"the {cmd.attack} attack"), profile
    if not isinstance(cmd.config, cls.config_class):
        raise UserError(f"the {cmd.attack} attack takes a {cls.config_class.__name__}, got "
                        f"{type(cmd.config).__name__}")
    cmd.config.validate()
    return cmd.config, profile


def run_attack(cmd: AttackCommand) -> AttackOutcome:
    """Set the attack up (targets, direction, objective references), run it, write ``suffix.json``."""
    cls = get_attack(cmd.attack)
    cfg, profile = attack_config(cmd)  # before minutes of model loading
    cmd.inputs.validate()
    if cmd.direction and not cls.uses_direction and not cmd.inputs.needs_direction:
        raise UserError(f"the {cmd.attack} attack takes no direction; drop --direction")
    if cmd.inputs.needs_direction and not cmd.direction:
        raise UserError("--targets ablated needs --direction RUN (the direction ablated while the model answers)")
    terms = set(getattr(cfg, "terms", ()))
    missing = sorted(terms & set(cls.direction_terms)) if not cmd.direction else []
    if missing:
        raise UserError(f"--objective {missing[0]} needs --direction RUN")
    instructions = attack_instructions(cmd.inputs, cmd.data_dir)
    out = Path(cmd.out).expanduser()
    cm = cmd.model.load(progress=cmd.progress)
    vec, info = direction_of(cm, cmd.direction, cmd.allow_other_model) if cmd.direction else (None, None)
    targets = attack_targets(cmd.inputs, instructions, cm, vec, device=cmd.model.device, progress=cmd.progress)
    attack = build_attack(cls, cfg, cm, (vec, info["layer"]) if info and cls.uses_direction else None, cmd.data_dir)
    # Only once the settings, model and direction are known to be good. A folder an older
    # suite wrote (a checkpoint or suffix.json, no run.json) is an attack run too.
    if not (out / RUN_FILE).exists() and any((out / f).is_file() for f in ("checkpoint.json", "suffix.json")):
        write_json_atomic(out / RUN_FILE, {"kind": "attack", "model": cm.name, "fingerprint": cm.fingerprint()})
    open_run(out, "attack", {"model": cm.name, "fingerprint": cm.fingerprint()})
    logging.getLogger("suffix_analysis.attacks").setLevel(logging.INFO if cmd.progress else logging.WARNING)
    result = attack.run(cm, instructions, targets, out=out, resume=cmd.resume)
    record = {**result.to_dict(), "model": cmd.model.model, "fingerprint": cm.fingerprint(),
              "instructions": instructions, "targets": targets, "config": dataclasses.asdict(cfg), "profile": profile,
              "targets_from": cmd.inputs.targets_from()}
    if info is not None:
        record.update(provenance(info))
    write_json_atomic(out / "suffix.json", record)
    steps = len(result.step_seconds)
    return AttackOutcome(str(out), record, steps, sum(result.step_seconds) / max(steps, 1))
