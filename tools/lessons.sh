#!/usr/bin/env bash
# The main job: set up .venv, run every lesson notebook headless (figures kept), write the executed copies, an HTML
# page per lesson, index.html and a summary table to a run folder. Size: COURSE_SIZE, else full on CUDA, medium on the CPU
# (the device the lessons use: COURSE_DEVICE=cpu on a GPU box gives medium and no #| cuda cells).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python tools/run_lessons.py "$@"  # output: COURSE_RUN_DIR, else runs/<date>-<size>
