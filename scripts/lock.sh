#!/usr/bin/env bash
# Regenerate requirements.lock, the exact environment `make setup` / `make test` install.
#
# Why `pip freeze` in a fresh venv (and not pip-tools or uv): the machines this project is tested on
# serve torch/torchvision from a local wheel folder and cap them through pip's own configuration,
# which only pip honours; pip-compile would need its own resolver run per extra, and uv ignores the
# local wheels (it would download a 3 GB CUDA torch). Resolving with the same pip that installs, in a
# fresh venv, and freezing *everything* (pip and setuptools included) pins the whole tested set.
#
# The lock is for CPython 3.11 on x86_64 Linux (the CI machine). Library users get pyproject's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet ".[test,leaderboard]"
"$work/venv/bin/python" -m pip check
{
  echo "# requirements.lock: the whole environment the test suite ran with (CPython 3.11, x86_64 Linux)."
  echo "# Installed by \`make setup\` as constraints (pip install -c requirements.lock -e .[test,leaderboard])."
  echo "# Regenerate with \`make lock\` (scripts/lock.sh); test against the newest releases with \`make test-unlocked\`."
  "$work/venv/bin/python" -m pip freeze --all | grep -v -i '^vrp-eval' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) pins)"
