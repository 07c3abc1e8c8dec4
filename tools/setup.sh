#!/usr/bin/env bash
# Create .venv (once) and install course_lib with its pinned dependencies (again only when settings.ini or setup.py change).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${COURSE_PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), f"Python 3.11 or 3.12 needed, {sys.executable} is {sys.version.split()[0]} (set COURSE_PYTHON)"'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "python3 -m venv failed: on Debian, 'apt-get install python3-venv' first" >&2; exit 1; }
fi
stamp=.venv/.course_lib-installed
want=$(cat settings.ini setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing course_lib and its pinned dependencies into .venv (torch is a large download the first time)..."
  start=$SECONDS
  # pip's notes about local package folders configured on some machines are noise here
  .venv/bin/python -m pip install -q -e ".[dev]" 2> >(grep -v '^WARNING: Location' >&2)
  echo "$want" > "$stamp"
  echo "Installed in $((SECONDS - start))s."
fi
