"""Does the Runner cost anything on lesson 7's real work? `Resnet2` trained for one epoch on a CIFAR-10 subset (default
10,000 images, then a validation pass over 2,000 test images) (a) by a plain loop that does the work inline (move
to the device, flip and pad-crop with a seeded generator, normalise, forward, `nll_loss`, backward, `SGDW` step,
sums of loss and accuracy kept on the device and read once per pass) and (b) by `Runner` with lesson 7's pipeline
callbacks (`DeviceCallback` with channels-last, `AugmentCallback`, `BatchTransformXCallback`) and
`AvgStatsCallback`. Same initial weights, same batches in the same order, same augmentation; runs alternate in one
process (and which goes first alternates), after one warm-up run of each. Prints both runs' statistics (they must
agree to 1e-6) and the time ratio (b)/(a). Target: <= 1.05.

    .venv/bin/python bench/resnet_runner.py [--threads 2] [--reps 3] [--n 10000] [--quick] [--wall]

Times are the process's CPU time by default (other jobs on a shared machine disturb it much less than the wall
clock); `--wall` for the wall clock. Note the load average printed: measure on a quiet machine.
"""
from __future__ import annotations
import argparse, copy, os, statistics, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from course_lib.core import set_seed
from course_lib.training import accuracy
from course_lib.callbacks import Runner, Learner, AvgStatsCallback
from course_lib.anneal import SGDW
from course_lib.vision import cifar_data, cifar_stats, Normalize, cifar_cbs, flip_pad_crop
from course_lib.resnet import Resnet2


def plain_fit(model, opt, data, norm, seed, device, fmt=torch.channels_last):
    "(a): one epoch and a validation pass with the pipeline's work written inline."
    model.to(device, memory_format=fmt)
    g = torch.Generator(device).manual_seed(seed)
    res = []
    for train, dl in ((True, data.train_dl), (False, data.valid_dl)):
        model.train(train)
        tl, ta, n = 0., 0., 0
        with torch.set_grad_enabled(train):
            for xb, yb in dl:
                xb, yb = xb.to(device, non_blocking=True, memory_format=fmt), yb.to(device, non_blocking=True)
                if train: xb = flip_pad_crop(xb, generator=g)
                xb = norm(xb)
                pred = model(xb)
                loss = F.nll_loss(pred, yb)
                with torch.no_grad():
                    bn = len(yb); n += bn; tl += loss.detach() * bn; ta += accuracy(pred, yb) * bn
                if not train: continue
                loss.backward(); opt.step(); opt.zero_grad()
        res += (torch.stack([torch.as_tensor(tl), torch.as_tensor(ta)]) / n).tolist()
    return res


def runner_fit(model, opt, data, norm, seed, device):
    "(b): the same through the Runner and lesson 7's callbacks."
    run = Runner(cifar_cbs(norm, seed=seed, device=device, channels_last=True) + [AvgStatsCallback(accuracy, silent=True)])
    run.fit(1, Learner(model, opt, F.nll_loss, data))
    h = run.avg_stats.history[-1]
    return [h['train_loss'], h['train_accuracy'], h['valid_loss'], h['valid_accuracy']]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--n', type=int, default=10_000, help='training images (default 10,000)')
    ap.add_argument('--n_valid', type=int, default=2_000, help='test images for the validation pass (default 2,000)')
    ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--threads', type=int, default=2, help='torch.set_num_threads (default 2)')
    ap.add_argument('--reps', type=int, default=3, help='timed runs of each (default 3)')
    ap.add_argument('--quick', action='store_true', help='1,000 images, 500 test images, 2 runs each: checks the script in seconds')
    ap.add_argument('--wall', action='store_true', help='time with the wall clock instead of the CPU time of this process')
    ap.add_argument('--device', default='cpu')
    args = ap.parse_args()
    if args.quick: args.n, args.n_valid, args.reps = 1_000, 500, 2
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    norm = Normalize(*cifar_stats(cifar_data().train_ds.x))
    set_seed(0)
    model0 = Resnet2([16, 32, 64, 128, 256], 10, 0.2)
    clock = time.perf_counter if args.wall else time.process_time
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), {dev}, {"wall-clock" if args.wall else "CPU"} time, '
          f'Resnet2 one epoch on {args.n:,} images (bs {args.bs}) + validation on {args.n_valid:,}; load average {os.getloadavg()[0]:.2f}', flush=True)

    def one(kind):
        model = copy.deepcopy(model0)
        opt = SGDW(model.parameters(), lr=1e-2, wd=1e-5)
        data = cifar_data(args.bs, args.n, args.n_valid, seed=1)  # same subset and shuffle every time
        torch.manual_seed(2)  # dropout
        if dev.type == 'cuda': torch.cuda.synchronize()
        t = clock()
        res = (plain_fit if kind == 'a' else runner_fit)(model, opt, data, norm, 3, dev)
        if dev.type == 'cuda': torch.cuda.synchronize()
        return clock() - t, res, model

    one('a'); one('b')  # warm-up
    ta, tb = [], []
    for i in range(args.reps):
        for kind in ('ab' if i % 2 == 0 else 'ba'):
            t, r, m = one(kind)
            if kind == 'a': ta.append(t); ra, ma = r, m
            else: tb.append(t); rb, mb = r, m
            print(f'  run {i} ({kind}): {t:.2f}s  load average {os.getloadavg()[0]:.2f}', flush=True)
    diff = max(abs(p - q) for p, q in zip(ra, rb))
    w_diff = max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters()))
    print(f'(a) plain loop: train loss {ra[0]:.6f} acc {ra[1]:.4f}, valid loss {ra[2]:.6f} acc {ra[3]:.4f}')
    print(f'(b) Runner:     train loss {rb[0]:.6f} acc {rb[1]:.4f}, valid loss {rb[2]:.6f} acc {rb[3]:.4f}')
    print(f'max statistic diff {diff:.1e}, max weight diff {w_diff:.1e} {"OK" if diff <= 1e-6 else "MISMATCH"}')
    ratios = [b / a for a, b in zip(ta, tb)]
    print(f'time (a) median {statistics.median(ta):.2f}s  (b) median {statistics.median(tb):.2f}s | ratio (b)/(a): '
          f'median of pairs {statistics.median(ratios):.3f}, min/min {min(tb)/min(ta):.3f} (target <= 1.05); '
          f'load average {os.getloadavg()[0]:.2f}')
    if diff > 1e-6: sys.exit('the statistics of (a) and (b) differ by more than 1e-6')

if __name__ == '__main__': main()
