#!/usr/bin/env bash
# The main job: set up .venv, run every lesson notebook headless (figures kept), write the executed copies, an HTML
# page per lesson, index.html and a summary table to a run folder. Size: COURSE_SIZE, else full with a GPU, medium without.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${COURSE_SIZE:-}" ]; then
  if .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then COURSE_SIZE=full; else COURSE_SIZE=medium; fi
fi
export COURSE_SIZE
out=${COURSE_RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)-$COURSE_SIZE}
exec .venv/bin/python tools/run_lessons.py --out "$out" "$@"
