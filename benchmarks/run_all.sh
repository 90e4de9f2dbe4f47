#!/usr/bin/env bash
# `make bench`: every benchmark in its --quick mode, one after the other (they must not share
# the cores), then each one's RATIO lines gathered in one table. Exits non-zero if any failed.
# Usage: benchmarks/run_all.sh [PYTHON] [extra args for every benchmark]
set -uo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
shift || true
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
started=$SECONDS
grep -m1 "model name" /proc/cpuinfo | sed 's/^model name\s*: /CPU: /'
echo "cores: $(nproc); load: $(cut -d' ' -f1 /proc/loadavg)"
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  echo "== $name"
  t0=$SECONDS
  if ! HF_HUB_OFFLINE=1 "$python" "$bench" --quick "$@" 2>&1 | tee "$logs/$name.log"; then
    failed+=("$name")
  fi
  echo "== $name: $((SECONDS - t0)) s"
  echo "$((SECONDS - t0))" > "$logs/$name.seconds"
done
echo
echo "== ratios (each against a baseline measured in the same run)"
for log in "$logs"/*.log; do
  name=$(basename "$log" .log)
  echo "-- $name ($(cat "$logs/$name.seconds") s)"
  grep '^RATIO' "$log" | sed 's/^RATIO /  /' || echo "  (no RATIO line)"
done
echo "all benchmarks: $((SECONDS - started)) s"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
