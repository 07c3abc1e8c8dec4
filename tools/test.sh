#!/usr/bin/env bash
# The test command (what .ci/run calls): set up .venv, check course_lib/ is exactly what nbdev_export makes
# from nbs/, run every notebook with nbdev_test, then the pytest suite. Defaults to the quick lesson size.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export COURSE_SIZE=${COURSE_SIZE:-quick}
export MPLBACKEND=${MPLBACKEND:-Agg}
bin=.venv/bin
start=$SECONDS

echo "== 1/3 course_lib/ matches nbs/ (nbdev_export, then git diff)"
$bin/nbdev_export
if ! git diff --exit-code --stat -- course_lib || [ -n "$(git status --porcelain -- course_lib)" ]; then
  git status --porcelain -- course_lib
  echo "course_lib/ differs from what nbdev_export makes from nbs/: export and commit the library (never edit it by hand)." >&2
  exit 1
fi

echo "== 2/3 notebooks (nbdev_test, COURSE_SIZE=$COURSE_SIZE, cell flags: '${COURSE_FLAGS:-}')"
t=$SECONDS
# nbdev_test runs one notebook per core at once: one torch thread each, or small models crawl from oversubscription
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $bin/nbdev_test --timing ${COURSE_FLAGS:+--flags "$COURSE_FLAGS"}
echo "notebooks took $((SECONDS - t))s"

echo "== 3/3 pytest"
t=$SECONDS
$bin/pytest -q -p no:cacheprovider tests
echo "pytest took $((SECONDS - t))s; whole test command $((SECONDS - start))s"
