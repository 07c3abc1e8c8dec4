#!/usr/bin/env bash
# The test command (what .ci/run calls): set up .venv, check course_lib/ is exactly what nbdev_export makes from nbs/,
# then run every notebook with nbdev_test and the pytest suite, once per device of COURSE_TEST_DEVICES (space-separated):
#   cpu      the lessons and tests on the CPU, as a laptop runs them
#   standin  CUDA played on the CPU by tools/standin (it fails where a GPU would), with the `#| cuda` cells
#   cuda     a real GPU, with the `#| cuda` cells
# Default: `cuda` where torch can use a GPU, else `cpu standin`. Lesson size: COURSE_SIZE, default quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export COURSE_SIZE=${COURSE_SIZE:-quick}
export MPLBACKEND=${MPLBACKEND:-Agg}
bin=.venv/bin
start=$SECONDS

echo "== course_lib/ matches nbs/ (nbdev_export, then git diff)"
$bin/nbdev_export
if ! git diff --exit-code --stat -- course_lib || [ -n "$(git status --porcelain -- course_lib)" ]; then
  git status --porcelain -- course_lib
  echo "course_lib/ differs from what nbdev_export makes from nbs/: export and commit the library (never edit it by hand)." >&2
  exit 1
fi

if [ -z "${COURSE_TEST_DEVICES:-}" ]; then
  if $bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then COURSE_TEST_DEVICES=cuda
  else COURSE_TEST_DEVICES="cpu standin"; fi
fi
for dev in $COURSE_TEST_DEVICES; do
  case $dev in
    cpu)     env=(COURSE_DEVICE=cpu COURSE_STANDIN=); flags=${COURSE_FLAGS:-} ;;
    standin) env=(COURSE_STANDIN=cuda "PYTHONPATH=$PWD/tools/standin${PYTHONPATH:+:$PYTHONPATH}"); flags=${COURSE_FLAGS-cuda} ;;
    cuda)    env=(COURSE_STANDIN=); flags=${COURSE_FLAGS-cuda} ;;
    *) echo "COURSE_TEST_DEVICES: unknown device '$dev', expected cpu, standin or cuda" >&2; exit 2 ;;
  esac
  echo "== $dev: notebooks (nbdev_test, COURSE_SIZE=$COURSE_SIZE, cell flags: '$flags')"
  t=$SECONDS
  # nbdev_test runs one notebook per core at once: one torch thread each, or small models crawl from oversubscription
  env "${env[@]}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $bin/nbdev_test --timing ${flags:+--flags "$flags"}
  echo "$dev: notebooks took $((SECONDS - t))s"
  echo "== $dev: pytest"
  t=$SECONDS
  env "${env[@]}" $bin/pytest -q -p no:cacheprovider tests
  echo "$dev: pytest took $((SECONDS - t))s"
done
echo "whole test command $((SECONDS - start))s ($COURSE_TEST_DEVICES)"
