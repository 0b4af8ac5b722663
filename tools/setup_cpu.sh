#!/usr/bin/env bash
# Create .venv (Python 3.12) in the repository root with the exact versions the CPU test suite
# runs on (tools/constraints-cpu.txt) and install megatron_sppo into it, editable.
# Re-running is cheap: nothing is reinstalled while setup.py and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python312() {
  local candidate
  if python3.12 -c 'import sys' >/dev/null 2>&1; then echo python3.12; return; fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  if PYENV_VERSION=3.12.1 python3.12 -c 'import sys' >/dev/null 2>&1; then
    echo "env PYENV_VERSION=3.12.1 python3.12"; return
  fi
  return 1
}

stamp=.venv/.megatron-sppo-setup
want=$(cat setup.py tools/constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

if ! py=$(find_python312); then
  echo "error: Python 3.12 not found (megatron-core >= 0.17 needs it): install python3.12" \
       "(e.g. 'pyenv install 3.12' or 'apt-get install python3.12-venv') and re-run" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  rm -rf .venv
  echo "setup: creating .venv with $($py --version 2>&1)"
  $py -m venv .venv
fi
echo "setup: installing pinned packages (torch is a ~5 GB CUDA build that runs on CPU; a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c tools/constraints-cpu.txt -e '.[test]' 2> >(grep -v "Location '.*' is ignored" >&2)
echo "$want" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "megatron-core", v("megatron-core"), "transformers", v("transformers"))'))"
