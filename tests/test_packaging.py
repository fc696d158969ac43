"""A non-editable install (a wheel) carries the shipped instruction sets, passages, the
organism's delta and the built-in attacks, and the command resolves a shipped split from
the installed package."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow  # builds and installs a wheel
def test_wheel_holds_the_shipped_sets_and_resolves_them(tmp_path, tiny_folder):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"  # a copy: the build writes build/ and egg-info beside the sources
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("suffix_analysis-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"suffix_analysis/data/harmful.json", "suffix_analysis/data/harmless.json",
            "suffix_analysis/data/contexts.json",
            "suffix_analysis/data/organism/smollm2-135m-refusal.safetensors"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gcg = suffix_analysis.attacks.gcg:GCG" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import suffix_analysis.datasets as d; print(d._shipped_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where  # the installed copy, not this checkout
    p = subprocess.run([sys.executable, "-m", "suffix_analysis", "refusal", "--judge", "substring",
                        "--model", str(tiny_folder),
                        "--instructions", "harmful:test", "--limit", "2", "--max-new-tokens", "1", "--json", "-q"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["n"] == 2


def test_no_module_imports_itself_through_others():
    """No import circle between the suite's modules, lazy imports inside functions included
    (import-linter's layers see only imports across layers)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("suffix_analysis")
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d.startswith("suffix_analysis.")}
             for m in graph.modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {cycles}"
