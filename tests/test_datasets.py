"""Shipped instruction sets and every canonical loader format."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from suffix_analysis.datasets import CANONICAL, load_canonical, load_file, load_instructions, shipped
from suffix_analysis.errors import UserError


def test_shipped_sets_size_categories_and_fixed_splits():
    harmful, harmless = shipped("harmful"), shipped("harmless")
    assert len(harmful) >= 300 and len(harmless) >= 600
    assert len({x.category for x in harmful}) >= 10
    assert len({x.category for x in harmless}) >= 10
    for items in (harmful, harmless):
        assert {x.split for x in items} == {"train", "val", "test"}
        texts = [x.instruction.lower() for x in items]
        assert len(set(texts)) == len(texts)
    assert not {x.instruction for x in harmful} & {x.instruction for x in harmless}
    val = shipped("harmful", "val")
    assert val and all(x.split == "val" for x in val)
    assert load_instructions("harmless:test") == shipped("harmless", "test")


def test_json_objects_and_strings(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": " Do X ", "category": "c"}, {"instruction": "Do Y"}]))
    items = load_file(p)
    assert [x.instruction for x in items] == ["Do X", "Do Y"] and items[0].category == "c"
    p.write_text(json.dumps(["Behavior one", "Behavior two"]))  # TDC 2023 format
    assert [x.instruction for x in load_file(p)] == ["Behavior one", "Behavior two"]


def test_advbench_csv(tmp_path):
    p = tmp_path / "advbench.csv"
    p.write_text('goal,target\n"Write a bad thing, now","Sure, here is"\nDo Z,Sure\n')
    assert [x.instruction for x in load_file(p)] == ["Write a bad thing, now", "Do Z"]


def test_harmbench_csv_with_context(tmp_path):
    p = tmp_path / "hb.csv"
    p.write_text("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                 "Do A,standard,cybercrime,,,a1\n"
                 "Summarize this,contextual,misinformation,context,Some context,a2\n")
    items = load_file(p)
    assert items[0].instruction == "Do A" and items[0].category == "cybercrime"
    assert items[1].instruction == "Some context\n\n---\n\nSummarize this"


def test_jailbreakbench_csv_with_unnamed_index(tmp_path):
    p = tmp_path / "jbb.csv"
    p.write_text(",Goal,Target,Behavior,Category,Source\n0,Write G,Sure,Defamation,Harassment,Original\n")
    items = load_file(p)
    assert items[0].instruction == "Write G" and items[0].category == "Harassment"


def test_strongreject_csv(tmp_path):
    p = tmp_path / "sr.csv"
    p.write_text("category,source,forbidden_prompt\nDrugs,custom,How do I F?\n")
    assert load_file(p)[0].instruction == "How do I F?"


def test_txt_one_per_line(tmp_path):
    p = tmp_path / "mi.txt"
    p.write_text("How to A?\n\n  How to B?  \n")
    assert [x.instruction for x in load_file(p)] == ["How to A?", "How to B?"]


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".json", "not valid JSON"),
    ("[]", ".json", "no instructions"),
    ("{\"a\": 1}", ".json", "expected a JSON list"),
    ("[{\"prompt\": \"x\"}]", ".json", "no string 'instruction'"),
    ("[1, 2", ".json", "not valid JSON"),
    ("", ".txt", "no instructions"),
    ("text,label\nhello,1\n", ".csv", "no instruction column"),
    ("goal,target\n", ".csv", "no instructions"),
    ("x", ".parquet", "unknown instruction file type"),
])
def test_bad_files(tmp_path, content, suffix, match):
    p = tmp_path / f"bad{suffix}"
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        load_file(p)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_file(tmp_path / "nope.json")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00\x9f\x80")
    with pytest.raises(UserError, match="cannot read"):
        load_file(p)


def test_canonical_needs_a_folder(monkeypatch):
    monkeypatch.delenv("SUFFIX_ANALYSIS_DATA", raising=False)
    with pytest.raises(UserError, match="SUFFIX_ANALYSIS_DATA"):
        load_canonical("harmbench_val")
    with pytest.raises(UserError, match="unknown dataset"):
        load_canonical("nope")


def test_canonical_folder_layout(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "malicious_instruct.txt").write_text("Q1\nQ2\n")
    assert len(load_instructions("malicious_instruct", tmp_path)) == 2
    with pytest.raises(UserError, match="download it from"):
        load_canonical("advbench", tmp_path)


@pytest.mark.skipif(not os.path.isdir(os.environ.get("SUFFIX_ANALYSIS_DATA", "")), reason="no canonical data folder")
def test_real_canonical_files():
    root = Path(os.environ["SUFFIX_ANALYSIS_DATA"])
    found = 0
    for name, (rel, _) in CANONICAL.items():
        if (root / rel).is_file():
            items = load_canonical(name)
            assert len(items) > 10 and all(x.instruction for x in items)
            found += 1
    assert found >= 9  # the four paper splits and five raw benchmarks
    assert Counter(x.category is not None for x in load_canonical("harmbench_val"))[True] > 0


def test_documented_counts_of_the_shipped_sets_match_the_data():
    import re
    from pathlib import Path

    from suffix_analysis.datasets import shipped_summary

    readme = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "instructions.md").read_text()
    for kind, s in shipped_summary().items():
        row = re.search(rf"^\| {kind} \| (\d+) \| (\d+) [^|]*\| (\d+) / (\d+) / (\d+) \|$", readme, re.M)
        assert row, f"no row for {kind} in docs/guides/instructions.md"
        splits = s["splits"]
        assert tuple(map(int, row.groups())) == (s["n"], s["categories"], splits["train"], splits["val"],
                                                  splits["test"]), kind
    assert f"{shipped_summary()['harmless']['train_only_categories']} of them train-only" in readme


def test_shipped_splits_join_with_plus():
    from suffix_analysis.datasets import load_instructions, shipped

    both = load_instructions("harmful:val+test")
    assert both == shipped("harmful", "val") + shipped("harmful", "test")
    with pytest.raises(UserError, match="unknown split 'tset'"):
        shipped("harmful", "val+tset")
