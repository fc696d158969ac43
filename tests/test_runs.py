"""Run folders: nothing of a user's lost, no traceback on a corrupt run.

Each test here failed on the code before ``runs.py``: outputs replaced or written into folders
the suite did not make, and corrupt records ending in tracebacks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_model
from test_pipeline import LOOSE, data_files  # noqa: F401  (a fixture)
from test_reproduce import setup  # noqa: F401  (a fixture)

from suffix_analysis.directions.run import DirectionConfig, load_direction, run_direction
from suffix_analysis.errors import UserError
from suffix_analysis.interventions.orthogonalize import export_orthogonalized
from suffix_analysis.reproduce import reproduce
from suffix_analysis.runs import digest, open_run, read_json


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mine(folder: Path) -> Path:
    """A folder of the user's own work."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return folder


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_orthogonalize_never_replaces_a_folder_it_did_not_write(tmp_path):
    cm = tiny_chat_model("llama")
    user = mine(tmp_path / "user")
    before = snapshot(user)
    with pytest.raises(UserError) as e:
        export_orthogonalized(cm, torch.ones(cm.d_model), user, {})
    assert "not an orthogonalized model folder" in one_line(e) and "move it away" in str(e.value)
    assert snapshot(user) == before
    # its own export is replaced on a rerun; an empty folder is used
    out = export_orthogonalized(cm, torch.ones(cm.d_model), tmp_path / "ortho", {})
    export_orthogonalized(tiny_chat_model("llama"), -torch.ones(cm.d_model), out, {})
    (tmp_path / "empty").mkdir()
    assert (export_orthogonalized(tiny_chat_model("llama"), torch.ones(cm.d_model), tmp_path / "empty", {})
            / "config.json").is_file()


def test_organism_build_refuses_an_out_that_is_not_a_delta(tmp_path):
    from suffix_analysis.organism import build

    user = tmp_path / "weights.safetensors"
    user.write_bytes(b"not a delta at all")
    with pytest.raises(UserError, match="not an organism delta") as e:
        build(user, evaluate=False)
    one_line(e)
    assert user.read_bytes() == b"not a delta at all"
    folder = mine(tmp_path / "dir.safetensors")
    with pytest.raises(UserError, match="is a folder"):
        build(folder, evaluate=False)


def test_reproduce_redo_never_removes_folders_of_another_kind(setup, tmp_path):  # noqa: F811
    model, cfg, _ = setup
    user = mine(tmp_path / "user")
    for stage in ("direction", "attack"):  # folders named like stages, but the user's
        (user / stage).mkdir()
        (user / stage / "notes.md").write_text("keep")
    before = snapshot(user)
    with pytest.raises(UserError, match="holds no reproduce run") as e:
        reproduce(model, user, cfg, device="cpu", progress=False, redo=["direction"])
    one_line(e)
    assert snapshot(user) == before


def test_a_direction_run_is_not_written_into_a_users_folder(data_files):  # noqa: F811
    user = mine(data_files / "user")
    before = snapshot(user)
    with pytest.raises(UserError, match="holds no direction run"):
        run_direction(tiny_chat_model("llama"), user, DirectionConfig(**LOOSE), progress=False)
    assert snapshot(user) == before


@pytest.mark.parametrize("name,content", [
    ("run.json", '{"model": "tiny", "finger'),
    ("direction.json", "\xff\xfe not json"),
    ("direction.safetensors", "truncated"),
])
def test_corrupt_direction_run_files_are_one_line_errors(data_files, name, content):  # noqa: F811
    cm = tiny_chat_model("llama")
    run = data_files / "run"
    run_direction(cm, run, DirectionConfig(**LOOSE), progress=False)
    (run / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_direction(run, cm)
    assert name in one_line(e)


def test_a_corrupt_candidates_table_is_a_one_line_error(data_files):  # noqa: F811
    cm = tiny_chat_model("llama")
    run = data_files / "run"
    run_direction(cm, run, DirectionConfig(**LOOSE), progress=False)
    (run / "candidates.csv").write_text("position,layer\n-1,zero\n")
    (run / "direction.json").unlink()
    with pytest.raises(UserError, match="candidates.csv") as e:
        run_direction(cm, run, DirectionConfig(**LOOSE), progress=False)
    one_line(e)


def test_open_run_kinds_models_and_settings(tmp_path):
    rec = {"model": "m", "fingerprint": "w1-aa", "data": "d1", "config": {"steps": 5, "batch_size": 8}}
    out = tmp_path / "run"
    assert open_run(out, "attack", rec)["kind"] == "attack"
    # the same run: reopened; a free setting may change, and it is what the record returns
    assert open_run(out, "attack", {**rec, "config": {"steps": 5, "batch_size": 2}}, free=("batch_size",))[
        "config"]["batch_size"] == 2
    for other, match in [({"data": "d2"}, r"other inputs or settings \(data\)"),
                         ({"config": {"steps": 6, "batch_size": 8}}, r"config\.steps"),
                         ({"fingerprint": "w1-bb"}, "other weights")]:
        with pytest.raises(UserError, match=match):
            open_run(out, "attack", {**rec, **other})
    with pytest.raises(UserError, match="is an attack run, not a direction run"):
        open_run(out, "direction", rec)
    (out / "run.json").write_text("{")
    with pytest.raises(UserError, match="run.json is unreadable"):
        open_run(out, "attack", rec)
    with pytest.raises(UserError, match="is a file"):
        open_run(out / "run.json", "attack", rec)


def test_read_json_and_digest(tmp_path):
    with pytest.raises(UserError, match="missing; rerun"):
        read_json(tmp_path / "x.json", "rerun")
    (tmp_path / "x.json").write_bytes(b"\x80\x81")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(tmp_path / "x.json", "rerun")
    assert digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1}) != digest({"a": [2, 1], "b": 1})
    assert len(digest([])) == 16 and json.loads(json.dumps(digest(1))) == digest(1)
