#!/usr/bin/env bash
# The main job: set up .venv, run every lesson notebook headless, write the executed copies and a summary table
# (notebook, status, seconds, headline figure) to a run folder. Defaults to the full lesson size.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export COURSE_SIZE=${COURSE_SIZE:-full}
export PATH="$PWD/.venv/bin:$PATH"
export MPLBACKEND=${MPLBACKEND:-Agg}
out=${COURSE_RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)-$COURSE_SIZE}
exec .venv/bin/python tools/run_lessons.py --out "$out" "$@"
