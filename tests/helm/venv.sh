#!/usr/bin/env bash
# The venv with Helm's engine for the chart tests (PyPI helm-python-sdk, pinned): prints the
# venv's python. Created once under target/helm/.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=$PWD/target/helm/venv
mkdir -p target/helm
# Tests call this concurrently: one makes the venv, the others wait for it.
exec 9>target/helm/venv.lock
flock 9
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q 'helm-python-sdk==0.2.2' >&2
fi
echo "$venv/bin/python"
