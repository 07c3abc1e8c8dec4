#!/usr/bin/env python3
"""Plant back, one at a time, the GPU failures issue 28 found, and check that CI (the CUDA stand-in) fails on each.

Each plant undoes one fix in a scratch clone of the last commit (a text replacement in a notebook or a test), exports
the library there, and runs what CI runs on it: the notebook with `nbdev_test` and the test file with `pytest`, at quick
size, under the stand-in (`tools/standin`). A plant must make that run fail; the same run without any plant must pass.
With `--cpu` each plant also runs on the plain CPU, where (that was the problem) most of them pass unseen.

    .venv/bin/python tools/planted.py [--cpu] [--only ID ...] [--mirror ../shared/data]

It prints a table (plant, target, stand-in result, plain-CPU result) and exits non-zero if a plant went unseen."""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (id, what it plants back, file, text of the fix, text before the fix, targets, extra environment); tuples: several
PLANTS = [
    ('07-replay', "07_cifar replays the pipeline's crops with a CPU generator on a CPU batch", 'nbs/07_cifar.ipynb',
     "norm(flip_pad_crop(xb0.to(dev), generator=torch.Generator(dev).manual_seed(0))).cpu()",
     "norm(flip_pad_crop(xb0, generator=torch.Generator().manual_seed(0)))", ['nb:07_cifar'], {}),
    ('07-keep', "07_cifar keeps the batches the fit saw on the device and compares them", 'nbs/07_cifar.ipynb',
     "if self.in_train not in self.seen: self.seen[self.in_train] = self.xb.cpu()",
     "self.seen.setdefault(self.in_train, self.xb.clone())", ['nb:07_cifar'], {}),
    ('07-preds-model', "get_preds runs a CPU model on batches the pipeline moved to the GPU", 'nbs/07_cifar.ipynb',
     "ps.append(model(xb.to(dev)).float().softmax(-1))", "ps.append(model(xb).float().softmax(-1))", ['nb:07_cifar'], {}),
    ('07-preds-device', "get_preds and tta hand back GPU tensors (test_eq, test_close, the confusion plot)", 'nbs/07_cifar.ipynb',
     "return torch.cat(ps).cpu(), torch.cat(ys).cpu()", "return torch.cat(ps), torch.cat(ys)", ['nb:07_cifar'], {}),
    # 07b reads tta's predictions only as accuracies, log losses and confusion_matrix (CPU counts: plant 02-confusion)
    ('07-step', "07_cifar times a GPU model's step on a CPU batch", 'nbs/07_cifar.ipynb',
     "xb, yb = (t.to(dev) for t in next(iter(data.train_dl)))", "xb, yb = next(iter(data.train_dl))", ['nb:07_cifar'], {}),
    # 07b's confusion plot fails on a GPU only with all three guards gone: tta's predictions, the counts, the plot
    ('02-confusion', "tta hands back GPU predictions, confusion_matrix keeps GPU counts, plot_confusion gives them to matplotlib",
     ('nbs/07_cifar.ipynb', 'nbs/02_minibatch.ipynb', 'nbs/02_minibatch.ipynb'),
     ("return torch.cat(ps).cpu(), torch.cat(ys).cpu()",
      "return torch.bincount(targ * c + pred, minlength=c*c).view(c, c).cpu()",
      "ax, cm = ax or plt.subplots(figsize=(6, 6))[1], torch.as_tensor(cm).cpu()"),
     ("return torch.cat(ps), torch.cat(ys)", "return torch.bincount(targ * c + pred, minlength=c*c).view(c, c)",
      "ax = ax or plt.subplots(figsize=(6, 6))[1]"),
     ['nb:07b_resnet2'], {}),
    ('08-buffer', "08_transfer compares a GPU buffer with a CPU tensor", 'nbs/08_transfer.ipynb',
     "test_close(bns[0].running_mean.cpu(), mu, eps=1e-4)", "test_close(bns[0].running_mean, mu, eps=1e-4)", ['nb:08_transfer'], {}),
    ('06a-weights', "06a compares GPU weights with test_eq (numpy)", 'nbs/06a_rnn.ipynb',
     "test_eq(p.detach().cpu(), q.detach().cpu())", "test_eq(p.detach(), q.detach())", ['nb:06a_rnn'], {}),
    ('06a-exact', "06a asserts resumed = uninterrupted on the GPU without deterministic kernels", 'nbs/06a_rnn.ipynb',
     "with deterministic():  # on a GPU: the same bits, and cuDNN's own dropout state out of the way\n    run_a",
     "if True:\n    run_a", ['nb:06a_rnn'], {}),
    ('05h-nccl', "DistributedCallback takes NCCL whenever CUDA exists and sets the device to LOCAL_RANK", 'nbs/05h_distributed.ipynb',
     "        backend = pick_backend(fit_device(self.run), self.local_rank, n_local, self.backend)\n",
     "        backend = self.backend or ('nccl' if torch.cuda.is_available() else 'gloo')\n        if backend == 'nccl': torch.cuda.set_device(self.local_rank)\n",
     ['nb:05h_distributed', 'py:tests/test_distributed.py'], {}),
    ('05h-nccl-2gpus', "the same, on a box with two GPUs: NCCL gets the CPU model's parameters", 'nbs/05h_distributed.ipynb',
     "        backend = pick_backend(fit_device(self.run), self.local_rank, n_local, self.backend)\n",
     "        backend = self.backend or ('nccl' if torch.cuda.is_available() else 'gloo')\n        if backend == 'nccl': torch.cuda.set_device(self.local_rank)\n",
     ['nb:05h_distributed'], {'COURSE_STANDIN_GPUS': '2'}),
    ('transfer-test', "tests/test_transfer.py compares the fine-tuned model's GPU buffers with CPU copies", 'tests/test_transfer.py',
     "for k, v in model.named_buffers(): assert torch.equal(v.cpu(), before[k]), k",
     "for k, v in model.named_buffers(): assert torch.equal(v, before[k]), k", ['py:tests/test_transfer.py::test_fine_tune_trains_the_head_then_everything_with_batch_norm_kept'], {}),
    ('core-rng', "rng_states reads the GPU's generators only once CUDA is in use (lr_find then leaves them moved)", 'nbs/00_core.ipynb',
     "    if torch.cuda.is_available(): s['cuda'] = torch.cuda.get_rng_state_all()",
     "    if torch.cuda.is_available() and torch.cuda.is_initialized(): s['cuda'] = torch.cuda.get_rng_state_all()",
     ['py:tests/test_anneal.py::test_lr_find_puts_back_the_gpu_generator_even_when_cuda_starts_inside_it'], {}),
]

def sh(cmd, cwd, env, timeout=1200):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr

def replace_once(path, old, new):
    "Replace `old` by `new` in the file at `path` (for a notebook: in one cell's source), refusing unless it occurs once."
    text = path.read_text(encoding='utf-8')
    if path.suffix != '.ipynb':
        if text.count(old) != 1: raise SystemExit(f'{path}: the fix occurs {text.count(old)} times, expected once: {old[:70]!r}')
        return path.write_text(text.replace(old, new), encoding='utf-8')
    nb = json.loads(text)
    hits = [c for c in nb['cells'] if old in ''.join(c['source'])]
    if len(hits) != 1 or ''.join(hits[0]['source']).count(old) != 1:
        raise SystemExit(f'{path}: the fix occurs in {len(hits)} cells, expected once in one: {old[:70]!r}')
    hits[0]['source'] = ''.join(hits[0]['source']).replace(old, new).splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')

def pairs(f, fix, old):
    "The (file, fix, text before it) replacements of a plant: one, or several as tuples (fixes that guard each other)."
    if not isinstance(fix, tuple): return [(f, fix, old)]
    return list(zip(f if isinstance(f, tuple) else (f,) * len(fix), fix, old))

def run_target(target, clone, env):
    "Run one target in the clone; True if it passed."
    kind, what = target.split(':', 1)
    if kind == 'nb': rc, out = sh([str(ROOT/'.venv/bin/nbdev_test'), '--path', f'nbs/{what}.ipynb', '--flags', 'cuda'], clone, env)
    else: rc, out = sh([str(ROOT/'.venv/bin/pytest'), '-q', '-x', '-p', 'no:cacheprovider', what], clone, env)
    return rc == 0, out

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu', action='store_true', help='also run each plant on the plain CPU')
    p.add_argument('--only', nargs='*', help='plant ids to run (default: all)')
    p.add_argument('--mirror', default=str(ROOT.parent/'shared'/'data'), help='the offline dataset mirror')
    a = p.parse_args()
    plants = [q for q in PLANTS if not a.only or q[0] in a.only]
    clone = Path(tempfile.mkdtemp(prefix='planted.'))/'main'
    subprocess.run(['git', 'clone', '-q', str(ROOT), str(clone)], check=True)
    base = {**os.environ, 'CI': 'true', 'COURSE_SIZE': 'quick', 'COURSE_OFFLINE': '1', 'COURSE_DATA_MIRROR': a.mirror,
            'COURSE_DATA': str(ROOT/'data'), 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
    base.pop('COURSE_DEVICE', None)
    envs = {'stand-in': {**base, 'COURSE_STANDIN': 'cuda', 'PYTHONPATH': f'{clone}{os.pathsep}{clone/"tools"/"standin"}'},
            'cpu': {**base, 'COURSE_STANDIN': '', 'COURSE_DEVICE': 'cpu', 'PYTHONPATH': str(clone)}}
    export = lambda: sh([str(ROOT/'.venv/bin/nbdev_export')], clone, base)
    rows, bad = [], 0
    try:
        export()
        for t in sorted({t for q in plants for t in q[5]}):  # each target passes without a plant
            ok, out = run_target(t, clone, envs['stand-in'])
            if not ok: raise SystemExit(f'{t} fails under the stand-in without any plant: fix that first\n{out[-3000:]}')
        for pid, what, f, fix, old, targets, extra in plants:
            for ff, fx, ol in pairs(f, fix, old): replace_once(clone/ff, fx, ol)
            export()
            for t in targets:
                t0 = time.time()
                ok, out = run_target(t, clone, {**envs['stand-in'], **extra})
                cpu = ('passes (unseen)' if run_target(t, clone, {**envs['cpu'], **extra})[0] else 'fails') if a.cpu else '-'
                rows.append((pid, what, t, 'passes: NOT CAUGHT' if ok else 'fails', cpu, f'{time.time() - t0:.0f}s'))
                bad += ok
                print(f'{pid:16s} {t:60s} stand-in: {rows[-1][3]:18s} cpu: {cpu}', flush=True)
            subprocess.run(['git', 'checkout', '-q', '--', '.'], cwd=clone, check=True)
            export()
    finally: shutil.rmtree(clone.parent, ignore_errors=True)
    print('\n| plant | what it puts back | target | CI (stand-in) | plain CPU |\n|---|---|---|---|---|')
    for pid, what, t, sa, cpu, _ in rows: print(f'| {pid} | {what} | `{t}` | {sa} | {cpu} |')
    sys.exit(1 if bad else 0)

if __name__ == '__main__': main()
