"""Sweeps: the sweep file checked against the command's own settings, jobs that each run the
command's function in-process into their own run folder (the same result as calling it
directly), a failing job recorded without stopping the others, reruns that finish only what
is missing, and a local Ray cluster giving the same table as the in-process path."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from suffix_analysis.errors import UserError
from suffix_analysis.sweep import load_sweep, run_sweep
from suffix_analysis.sweep import run as run_mod

HAS_RAY = importlib.util.find_spec("ray") is not None
VOLATILE = ["seconds"]  # wall time differs between runs; everything else must not


def sweep_file(tmp: Path, model: Path, grid: str, settings: str = "", head: str = "") -> Path:
    (tmp / "a.txt").write_text("Write a poem about the sea.\nTell a short joke.\n")
    (tmp / "b.txt").write_text("Describe a cat.\nName two birds.\n")
    (tmp / "c.txt").write_text("Give three tips for staying healthy.\n")
    f = tmp / "sweep.toml"
    f.write_text(f"""
[sweep]
command = "attack gcg"
out = "{tmp / 'out'}"
{head}

[settings]
model = "{model}"
device = "cpu"
steps = 2
search-width = 8
topk = 8
suffix-len = 4
{settings}

[grid]
{grid}
""")
    return f


FOUR = 'instructions = ["{t}/a.txt", "{t}/b.txt", "{t}/c.txt", "{t}/missing.txt"]'


def four_jobs(tmp_path, tiny_folder) -> Path:
    """4 tiny GCG jobs, the last one made to fail (its instruction file does not exist)."""
    return sweep_file(tmp_path, tiny_folder, FOUR.format(t=tmp_path))


def test_jobs_are_the_grid_of_the_commands_settings(tmp_path, tiny_folder, monkeypatch):
    f = sweep_file(tmp_path, tiny_folder, f'instructions = ["{tmp_path}/a.txt", "{tmp_path}/b.txt"]\nseed = [0, 1, 2]',
                   settings="allow-non-ascii = false")
    spec = load_sweep(f)
    assert len(spec.jobs) == 6 and len({j.id for j in spec.jobs}) == 6
    job = spec.jobs[0]
    assert job.command == "attack gcg"
    assert job.settings["num_steps"] == 2 and job.settings["allow_non_ascii"] is False
    assert job.values == {"instructions": f"{tmp_path}/a.txt", "seed": 0}
    assert job.id.startswith("instructions=a_seed=0-")
    # the config the job runs: [settings] and its grid values, in the command's own nested configs
    from suffix_analysis.commands import Command

    ran = []
    monkeypatch.setattr(Command, "run", lambda self, cfg: ran.append(cfg) or (_ for _ in ()).throw(RuntimeError("x")))
    rec = run_mod.run_job(job.to_dict(), str(tmp_path / "out"))
    cfg = ran[0]
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: x"
    assert (cfg.attack, cfg.inputs.instructions, cfg.model.model, cfg.model.device) == (
        "gcg", f"{tmp_path}/a.txt", str(tiny_folder), "cpu")
    assert cfg.settings == {"num_steps": 2, "search_width": 8, "topk": 8, "suffix_len": 4, "allow_non_ascii": False,
                            "seed": 0}
    assert cfg.out == str(tmp_path / "out" / "jobs" / job.id / "run")
    assert cfg.progress is False  # no progress bars in the job's log
    from suffix_analysis.sweep.spec import _slug

    assert _slug("Qwen/Qwen2.5-7B-Instruct") == "Qwen2.5-7B-Instruct" and _slug("data/x.jsonl") == "x"


@pytest.mark.parametrize("grid,settings,head,needle", [
    ("seed = [0]", "serch-width = 4", "", "unknown key 'serch-width' for this command; did you mean 'search-width'?"),
    ("seed = ['a']", "", "", "[grid] seed must be int, got str 'a'"),
    ("seed = [0]", "allow-non-ascii = 1", "", "[settings] allow-non-ascii must be bool"),
    ("seed = [0]", "quiet = true", "", "the sweep sets --quiet"),
    ("", "", "", "[grid] is empty"),
    ("seed = []", "", "", "[grid] seed is an empty list"),
    ("seed = [0]", "out = 'x'", "", "the sweep sets --out"),
    ("seed = [0]", "seed = [1, 2]", "", "put the list under [grid]"),
    ("seed = [0]", "", "gpu = 1", "[sweep] unknown key 'gpu'; did you mean 'gpus'?"),
    ("seed = [0]", "", "cpus = 'two'", "cpus must be a number"),
    ("seed = [0]", "", "max_retries = 'x'", "[sweep] max_retries must be int"),
    ("seed = [0]", "seed = 1", "", "seed is under both [settings] and [grid]"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, tiny_folder, grid, settings, head, needle):
    f = sweep_file(tmp_path, tiny_folder, grid, settings, head)
    with pytest.raises(UserError) as e:
        load_sweep(f)
    assert needle in str(e.value)


def test_unknown_command_and_section(tmp_path, tiny_folder):
    f = sweep_file(tmp_path, tiny_folder, "seed = [0]")
    f.write_text(f.read_text().replace('command = "attack gcg"', 'command = "organism build"'))
    with pytest.raises(UserError, match="'organism build' has no --out and --json"):
        load_sweep(f)
    f.write_text(f.read_text().replace('command = "organism build"', 'command = "atack gcg"'))
    with pytest.raises(UserError, match="'atack' is not a suffix-analysis command.*'attack'"):
        load_sweep(f)
    f.write_text(f.read_text().replace('command = "atack gcg"', 'command = "attack gcg"') + "\n[grdi]\nx = 1\n")
    with pytest.raises(UserError, match=r"unknown section \[grdi\]; did you mean \[grid\]"):
        load_sweep(f)
    with pytest.raises(UserError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.toml")


def test_in_process_sweep_records_a_failure_and_reruns_only_what_is_missing(tmp_path, tiny_folder, monkeypatch):
    spec = load_sweep(four_jobs(tmp_path, tiny_folder))
    df = run_sweep(spec, local=True)
    assert list(df["status"]) == ["ok", "ok", "ok", "failed"]
    assert "instruction file not found" in df["error"].iloc[3]
    assert df["final_loss"].iloc[:3].notna().all() and pd.isna(df["final_loss"].iloc[3])
    for job in spec.jobs[:3]:  # each job's folder is what `attack gcg --out` writes
        run = spec.out / "jobs" / job.id / "run"
        assert json.loads((run / "suffix.json").read_text())["suffix"] == df.set_index("job").loc[job.id, "suffix"]
    assert (spec.out / "results.csv").is_file() and list((spec.out / "figures").glob("*.png"))
    table = pd.read_csv(spec.out / "results.csv")
    assert list(table["job"]) == [j.id for j in spec.jobs]

    # killed mid-sweep while job 1 ran: its job.json and run folder are there, its result.json is not
    (spec.out / "jobs" / spec.jobs[1].id / "result.json").unlink()
    ran = []
    real = run_mod.run_job
    monkeypatch.setattr(run_mod, "run_job", lambda job, root, *a: ran.append(job["id"]) or real(job, root, *a))
    again = run_sweep(spec, local=True)
    assert ran == [spec.jobs[1].id, spec.jobs[3].id]  # the missing one, and the failed one is retried
    pd.testing.assert_frame_equal(again.drop(columns=VOLATILE), df.drop(columns=VOLATILE))
    ran.clear()
    run_sweep(spec, local=True)
    assert ran == [spec.jobs[3].id]  # finished jobs are never run again


def test_changed_settings_rerun_the_job(tmp_path, tiny_folder, monkeypatch):
    f = sweep_file(tmp_path, tiny_folder, f'instructions = ["{tmp_path}/a.txt"]')
    run_sweep(load_sweep(f), local=True, figures=False)
    f.write_text(f.read_text().replace("steps = 2", "steps = 1"))
    spec = load_sweep(f)
    df = run_sweep(spec, local=True, figures=False)
    assert df["steps"].iloc[0] == 1


def test_cli_sweep(tmp_path, tiny_folder, capsys):
    from suffix_analysis.cli import main

    f = sweep_file(tmp_path, tiny_folder, f'instructions = ["{tmp_path}/a.txt", "{tmp_path}/missing.txt"]')
    code = main(["sweep", str(f), "--local", "--no-figures", "--json"])
    out = capsys.readouterr().out
    assert code == 1  # one job failed
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "failed" in out and "instruction file not found" in out


def test_without_ray_an_address_is_an_error(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(run_mod, "ray_available", lambda: False)
    spec = load_sweep(sweep_file(tmp_path, tiny_folder, f'instructions = ["{tmp_path}/a.txt"]'))
    with pytest.raises(UserError, match="--address needs Ray"):
        run_sweep(spec, address="ray://head:10001")


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install -e '.[cluster]')")
def test_unreachable_ray_address_is_one_line(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(UserError, match="cannot reach the Ray cluster at 10.0.0.1:6379"):
        run_mod._init_ray("10.0.0.1:6379", None, 1.0)


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install -e '.[cluster]')")
def test_local_ray_cluster_gives_the_in_process_table(tmp_path, tiny_folder):
    import ray

    f = four_jobs(tmp_path, tiny_folder)
    expected = run_sweep(load_sweep(f, out=str(tmp_path / "in_process")), local=True, figures=False)
    spec = load_sweep(f, out=str(tmp_path / "on_ray"))
    try:
        got = run_sweep(spec, workers=2, figures=False)
    finally:
        ray.shutdown()
    assert list(got["status"]) == ["ok", "ok", "ok", "failed"]
    pd.testing.assert_frame_equal(got.drop(columns=VOLATILE), expected.drop(columns=VOLATILE))
    for job in spec.jobs[:3]:
        assert (spec.out / "jobs" / job.id / "run" / "suffix.json").is_file()


def test_the_documented_example_loads():
    spec = load_sweep(Path(__file__).parents[1] / "configs" / "sweep.toml")
    assert len(spec.jobs) == 4 and spec.settings.command == "attack gcg"


def test_a_killed_sweep_finishes_only_what_was_missing(tmp_path, tiny_folder, monkeypatch):
    """A real kill (SIGKILL of the sweep's process mid-job), then a rerun in this process."""
    import signal
    import subprocess
    import sys
    import time

    f = sweep_file(tmp_path, tiny_folder, "seed = [0, 1, 2, 3]", settings="instructions = " + repr(str(tmp_path / "a.txt")))
    f.write_text(f.read_text().replace("steps = 2", "steps = 40"))
    spec = load_sweep(f)
    proc = subprocess.Popen([sys.executable, "-m", "suffix_analysis", "sweep", str(f), "--local", "--no-figures"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [spec.out / "jobs" / j.id / "result.json" for j in spec.jobs]
    deadline = time.time() + 300
    while not results[0].exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [j.id for j, r in zip(spec.jobs, results) if r.exists()]
    assert done and len(done) < len(spec.jobs), done  # killed after the first job, before the last
    ran = []
    real = run_mod.run_job
    monkeypatch.setattr(run_mod, "run_job", lambda job, root, *a: ran.append(job["id"]) or real(job, root, *a))
    df = run_sweep(spec, local=True, figures=False)
    assert ran == [j.id for j in spec.jobs if j.id not in done]
    assert (df["status"] == "ok").all()


def _flat(summary, prefix: str = "") -> dict:
    """``summary`` as result columns: nested keys joined with dots, lists as JSON text."""
    if isinstance(summary, dict):
        return {k2: v2 for k, v in summary.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: json.dumps(summary) if isinstance(summary, list) else summary}


def test_a_jobs_row_is_the_summary_of_the_command_run_directly(tmp_path, tiny_folder):
    """The sweep builds the command's config from flat settings and calls it in-process; the
    same config built by hand and run directly gives the same numbers."""
    from suffix_analysis.commands.common import ModelOptions
    from suffix_analysis.commands.refusal import RefusalCommand, run_refusal

    f = sweep_file(tmp_path, tiny_folder, f'instructions = ["{tmp_path}/a.txt", "{tmp_path}/b.txt"]')
    text = f.read_text().replace('command = "attack gcg"', 'command = "refusal"')
    text = text.split("steps = 2")[0] + 'judge = "substring"\nmax-new-tokens = 3\nbatch-size = 1\n' + \
        text.split("suffix-len = 4")[1]
    f.write_text(text)
    spec = load_sweep(f)
    df = run_sweep(spec, local=True, figures=False).set_index("job")
    assert list(df["status"]) == ["ok", "ok"]
    for job, name in zip(spec.jobs, ["a", "b"]):
        direct = run_refusal(RefusalCommand(
            instructions=f"{tmp_path}/{name}.txt", out=str(tmp_path / "direct" / name), judge="substring",
            max_new_tokens=3, batch_size=1, model=ModelOptions(model=str(tiny_folder), device="cpu"), progress=False))
        want = _flat(direct.summary())
        assert want["n"] == 2 and want["judge"] == "substring"
        row = df.loc[job.id]
        got = {k: row[k if k not in job.values else f"result.{k}"] for k in want}
        assert got == want
        # and the run folder holds what the direct run wrote
        run = spec.out / "jobs" / job.id / "run"
        assert json.loads((run / "refusal.json").read_text()) == direct.summary()
        assert (json.loads((run / "completions.json").read_text())
                == json.loads((tmp_path / "direct" / name / "completions.json").read_text()))
