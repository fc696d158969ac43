"""nanoGCG's own environment: making it, checking it, and running nanoGCG in it.

nanogcg 0.3.0 pins ``transformers<=4.47.1`` while this suite needs transformers 5, so the
two cannot share an environment. :func:`make_env` makes a virtual environment with nanogcg
0.3.0 and transformers 4.47.1 that reuses this environment's torch (a ``.pth`` file puts
torch's folder on its path *after* its own packages, so its own transformers, tokenizers and
huggingface-hub shadow ours, and pip finds torch installed instead of downloading it again).
:func:`run_nanogcg` runs ``nanogcg_runner.py`` (a script, not imported here) with that
environment's python, passing the run as JSON and reading the result back as JSON.

Make the suite's default environment (in the suite's cache folder) from the command line::

    python -m suffix_analysis.attacks.nanogcg_env [DIR]
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..models.loading import ChatModel, cache_dir

log = logging.getLogger(__name__)

NANOGCG_VERSION = "0.3.0"
TRANSFORMERS_VERSION = "4.47.1"  # the newest nanogcg 0.3.0 accepts
RUNNER = Path(__file__).with_name("nanogcg_runner.py")
MAKE_HINT = "make it with: python -m suffix_analysis.attacks.nanogcg_env (about a minute)"
_PROBE = ("import json, importlib.metadata as m\n"
          "v = {}\n"
          "for p in ('nanogcg', 'transformers', 'torch'):\n"
          "    try: v[p] = m.version(p)\n"
          "    except m.PackageNotFoundError: v[p] = None\n"
          "print(json.dumps(v))")
_checked: dict[str, dict] = {}


def default_env() -> Path:
    """The environment the suite makes and uses by default: ``cache_dir()/nanogcg-env``."""
    return cache_dir() / "nanogcg-env"


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def resolve_python(given: str = "") -> Path:
    """The python that runs nanoGCG: ``given``, else ``$NANOGCG_PYTHON``, else the suite's env."""
    chosen = given or os.environ.get("NANOGCG_PYTHON", "")
    return Path(chosen).expanduser() if chosen else env_python(default_env())


def check_python(python: Path) -> dict:
    """The package versions (nanogcg, transformers, torch) of ``python``'s environment, or a
    one-line error naming the fix. Reads package metadata only (no torch import), so it is
    cheap enough to run before the model is loaded; remembered per path."""
    key = str(python)
    if key in _checked:
        return _checked[key]
    fix = (f"{MAKE_HINT}, or point --nanogcg-python / $NANOGCG_PYTHON at the python of one with nanogcg "
           f"{NANOGCG_VERSION}" if python == env_python(default_env()) else
           f"point --nanogcg-python / $NANOGCG_PYTHON at the python of an environment with nanogcg {NANOGCG_VERSION}, "
           f"e.g. one made by: python -m suffix_analysis.attacks.nanogcg_env [DIR]")
    if not python.is_file():
        raise UserError(f"no nanoGCG environment: {python} does not exist; {fix}")
    try:
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        versions = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        raise UserError(f"{python} does not run as a python ({type(e).__name__}); {fix}") from None
    if not versions.get("nanogcg"):
        raise UserError(f"{python} has no nanogcg installed; {fix}")
    if not versions.get("torch"):
        raise UserError(f"{python} finds no torch (was the environment it reuses moved?); {fix}")
    _checked[key] = versions
    return versions


def _site_of(module: str) -> Path:
    """The folder ``module`` is installed in (its site-packages), without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{module} is not installed here, so a nanoGCG environment cannot reuse it")
    return Path(list(spec.submodule_search_locations)[0]).parent


def _run(cmd: list[str], what: str, env: Path) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {done.returncode}"
    except OSError as e:
        done, last = None, f"{type(e).__name__}: {e}"
    if done is None or done.returncode != 0:
        raise UserError(f"making the nanoGCG environment in {env} failed while {what}: {last}; fix that and run "
                        f"python -m suffix_analysis.attacks.nanogcg_env {env} again")


def make_env(env: Path | str | None = None) -> Path:
    """Make (or reuse, when it already has nanogcg) a virtual environment in ``env`` (default:
    :func:`default_env`) with nanogcg 0.3.0 and transformers 4.47.1 that reuses this
    environment's torch; returns its python. Needs the package registry the first time."""
    env = Path(env).expanduser() if env else default_env()
    python = env_python(env)
    _checked.pop(str(python), None)
    if python.is_file():
        try:
            check_python(python)
            log.info("the nanoGCG environment in %s is ready", env)
            return python
        except UserError:
            pass  # half made or broken: make it again over what is there
    if env.exists() and any(env.iterdir()) and not (env / "pyvenv.cfg").is_file():
        raise UserError(f"{env} exists and is not a virtual environment; pick an empty or new folder")
    t0 = time.perf_counter()
    log.info("making the nanoGCG environment in %s (nanogcg %s, transformers %s, this torch)", env,
             NANOGCG_VERSION, TRANSFORMERS_VERSION)
    # The same interpreter as ours, so that our torch's compiled extensions load in it.
    _run([sys.executable, "-m", "venv", str(env)], "creating the virtual environment", env)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A .pth line is appended to sys.path after the env's own site-packages: its packages win.
    (Path(site) / "suffix_analysis_torch.pth").write_text(f"{_site_of('torch')}\n")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          f"nanogcg=={NANOGCG_VERSION}", f"transformers=={TRANSFORMERS_VERSION}"], "installing nanogcg", env)
    versions = check_python(python)
    if versions["transformers"] != TRANSFORMERS_VERSION:
        raise UserError(f"{python} imports transformers {versions['transformers']}, not {TRANSFORMERS_VERSION}; "
                        f"remove {env} and make it again")
    log.info("made the nanoGCG environment in %.0f s: %s", time.perf_counter() - t0,
             ", ".join(f"{k} {v}" for k, v in versions.items()))
    return python


def transformers4_config(cm: ChatModel) -> dict:
    """The model's config as transformers 4.47 reads it: transformers 5 keeps rope settings in
    ``rope_parameters`` (4.47 would silently fall back to its default rope_theta) and calls
    ``torch_dtype`` ``dtype``."""
    cfg = cm.model.config.to_dict()
    rope = dict(cfg.pop("rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise UserError(f"nanoGCG's transformers 4.47 cannot be given {cfg.get('model_type')}'s per-layer rope "
                        "settings; use the gcg attack for this model")
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = str(cm.dtype).removeprefix("torch.")
    cfg.pop("dtype", None)
    return cfg


def export_model(cm: ChatModel, folder: Path) -> dict:
    """A folder transformers 4.47 loads the model from, and what its tokenizer is rebuilt
    from there (transformers 5's tokenizer_config.json names classes 4.47 lacks): the part of
    the runner's spec that describes the model.

    The weights are ``cm.location``'s safetensors, linked, when it is a folder that has them
    (the model is what was loaded from there); else the model is saved here. The config is
    always written anew, as 4.47 reads it."""
    if cm.dispatched:
        raise UserError("nanoGCG runs the model on one device; load it without --device-map or offload")
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(cm.location) if cm.location else None
    weights = sorted(source.glob("*.safetensors")) if source and source.is_dir() else []
    if weights:
        for f in [*weights, *source.glob("*.safetensors.index.json")]:
            (folder / f.name).symlink_to(f.resolve())
    else:
        cm.model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(transformers4_config(cm)))
    tok_dir = folder / "tokenizer"
    cm.tokenizer.save_pretrained(tok_dir)
    t = cm.tokenizer
    specials = {"bos_token": t.bos_token, "eos_token": t.eos_token, "pad_token": t.pad_token, "unk_token": t.unk_token}
    return {"model_dir": str(folder), "tokenizer_file": str(tok_dir / "tokenizer.json"),
            "chat_template": cm.chat.template, "special_tokens": {k: v for k, v in specials.items() if v},
            "dtype": str(cm.dtype).removeprefix("torch."), "device": str(cm.device)}


def run_nanogcg(python: Path, spec: dict, work: Path, log_file: Path | None = None) -> dict:
    """Run nanoGCG once in ``python``'s environment on ``spec`` (model part from
    :func:`export_model`, plus instruction, target, threads and ``gcg``: nanogcg.GCGConfig's
    arguments); returns the runner's JSON (losses, step_seconds, best_string, best_ids,
    strings, versions). Its output (nanoGCG's progress bar and log) goes to ``log_file``."""
    check_python(python)
    spec_file, out_file = work / "spec.json", work / "result.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    log_file = log_file or work / "nanogcg.log"
    log.info("running nanoGCG in %s (its output: %s)", python, log_file)
    with open(log_file, "w") as sink:
        try:
            done = subprocess.run([str(python), str(RUNNER), str(spec_file), str(out_file)], stdout=sink,
                                  stderr=subprocess.STDOUT)
        except OSError as e:  # gone since it was checked
            raise UserError(f"{python} does not run ({type(e).__name__}: {e}); {MAKE_HINT}") from None
    if done.returncode != 0 or not out_file.is_file():
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise UserError(f"nanoGCG failed (exit status {done.returncode}): {last}; its whole output is in {log_file}")
    return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> None:
    """``python -m suffix_analysis.attacks.nanogcg_env [DIR]``: make the environment, print its python."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m suffix_analysis.attacks.nanogcg_env", description=make_env.__doc__)
    ap.add_argument("dir", nargs="?", help=f"where (default: {default_env()})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        python = make_env(args.dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(python)  # the one result, for NANOGCG_PYTHON=$(python -m ...)


if __name__ == "__main__":
    main()
