"""What does the Runner's callback machinery cost? The same training done (a) by a hand-written loop that does the
same work inline (LR schedule, loss and metric sums, recording of lrs and losses) and (b) by `Runner` with
`TrainEvalCallback`, `AvgStatsCallback`, `Recorder` and `ParamScheduler`: same model init, same batches in the same
order, runs alternated in one process. Prints the final losses of both (they must agree to 1e-6) and the time
ratio (b)/(a) per case. Target: ratio <= 1.05. Times are the process's CPU time (`--wall` for wall-clock), with
`torch.set_num_threads(--threads)` for every run.

    .venv/bin/python bench/runner_parity.py [--quick] [--threads 1] [--reps 9] [--case mlp] [--dataloader]

By default the batches are made once up front (one shuffle per epoch, replayed identically to both loops), so the
ratio is not diluted by the cost of a `DataLoader`; `--dataloader` uses lesson 2's `get_dls` with a seeded generator
instead. To add a case (lesson 5: device callback, mixed precision, hooks), append a `Case` to `CASES` with the
extra callbacks for the Runner (`runner_cbs`) and, in `hand_loop` (a copy of `hand_fit`), the same work done inline.
"""
from __future__ import annotations
import argparse, copy, os, statistics, sys, time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable
import torch
from torch import nn, optim
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from course_lib.core import set_seed
from course_lib.datasets import get_data, normalize
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import Runner, Learner, DataBunch, AvgStatsCallback
from course_lib.anneal import Recorder, ParamScheduler, combine_scheds, cos_1cycle_anneal
from course_lib.init import init_cnn
from course_lib.cuda import DeviceCallback, BatchTransformXCallback, view_tfm
from course_lib.cnn import get_cnn_model
from course_lib.hooks import HooksCallback, append_stats
from course_lib.accel import MixedPrecision


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    bs: int
    n_train: tuple  # (quick, full)
    epochs: int = 1
    lr: float = 0.1
    runner_cbs: Callable[[], list] = lambda: []   # extra callbacks for (b)
    hand_setup: Callable | None = None               # (model, opt) -> None: one-off setup for (a) (e.g. move to device)
    hand_loop: Callable | None = None                # a variant of `hand_fit` doing the extra per-batch work inline


def mlp(): return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))

def small_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)),
                         nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

CASES = [Case('mlp', mlp, bs=64, n_train=(10_000, 50_000), epochs=2),
         Case('conv', small_cnn, bs=256, n_train=(5_000, 30_000), lr=0.4)]


class Batches:
    "A loader replaying batches made up front: its k-th pass yields `epochs[k]`."
    def __init__(self, epochs): self.epochs,self.k = epochs,0
    def __len__(self): return len(self.epochs[0])
    def __iter__(self):
        b = self.epochs[self.k % len(self.epochs)]; self.k += 1
        return iter(b)

def make_data(x, y, xv, yv, bs, epochs, seed, dataloader):
    "A fresh `DataBunch` whose training batches come in the same order for every call with the same seed."
    if dataloader:
        g = torch.Generator().manual_seed(seed)
        return DataBunch(*get_dls(Dataset(x, y), Dataset(xv, yv), bs, generator=g), c=10)
    g = torch.Generator().manual_seed(seed)
    tr = [[(x[i], y[i]) for i in torch.randperm(len(x), generator=g).split(bs)] for _ in range(epochs)]
    va = [[(xv[i:i+2*bs], yv[i:i+2*bs]) for i in range(0, len(xv), 2*bs)]]
    return DataBunch(Batches(tr), Batches(va), c=10)


def hand_fit(epochs, model, opt, loss_func, data, sched, metrics=(accuracy,)):
    "(a): the Runner's work written inline: schedule, sums of loss and metrics, recording, train/eval modes."
    lrs, losses, history = [], [], []
    for epoch in range(epochs):
        n_epochs, iters = float(epoch), len(data.train_dl)
        model.train()
        tl, tm, tc = 0., [0.] * len(metrics), 0
        for xb, yb in data.train_dl:
            for pg in opt.param_groups: pg['lr'] = sched(n_epochs / epochs)
            pred = model(xb)
            loss = loss_func(pred, yb)
            with torch.no_grad():
                bn = len(yb); tc += bn; tl += loss.detach() * bn
                for i, m in enumerate(metrics): tm[i] += m(pred, yb) * bn
            loss.backward()
            opt.step()
            opt.zero_grad()
            lrs.append(opt.param_groups[-1]['lr']); losses.append(loss.detach())
            n_epochs += 1. / iters
        model.eval()
        with torch.no_grad():
            vl, vm, vc = 0., [0.] * len(metrics), 0
            for xb, yb in data.valid_dl:
                pred = model(xb)
                loss = loss_func(pred, yb)
                bn = len(yb); vc += bn; vl += loss.detach() * bn
                for i, m in enumerate(metrics): vm[i] += m(pred, yb) * bn
        history.append((torch.stack([torch.as_tensor(o).float() for o in [tl, *tm]]) / tc).tolist()
                       + (torch.stack([torch.as_tensor(o).float() for o in [vl, *vm]]) / vc).tolist())
    return history, torch.stack(losses).tolist(), lrs


def l5_cnn(): return init_cnn(get_cnn_model(SimpleNamespace(c=10), [8, 16, 32, 32], leak=0.1, sub=0.4, maxv=6.), a=0.1)

def l5_runner_cbs():
    "Lesson 5's callbacks: device, reshape, bf16 autocast, activation statistics (`append_stats`) on the four conv blocks."
    return [DeviceCallback('cpu'), BatchTransformXCallback(view_tfm(1, 28, 28)), MixedPrecision(torch.bfloat16),
            HooksCallback(append_stats, mods=lambda m: m[:4])]

def l5_hand_setup(model, opt):
    "The same statistics for (a): `append_stats` registered straight on the conv blocks (no Hook/Hooks/callback)."
    for m in model[:4]: m.register_forward_hook(partial(append_stats, SimpleNamespace()))

def l5_hand_fit(epochs, model, opt, loss_func, data, sched, metrics=(accuracy,)):
    "`hand_fit` plus lesson 5's per-batch work inline: move to the device (non-blocking), reshape, bf16 autocast."
    lrs, losses, history = [], [], []
    dev, ac = torch.device('cpu'), partial(torch.autocast, 'cpu', dtype=torch.bfloat16)
    for epoch in range(epochs):
        n_epochs, iters = float(epoch), len(data.train_dl)
        model.train()
        tl, tm, tc = 0., [0.] * len(metrics), 0
        for xb, yb in data.train_dl:
            xb, yb = xb.to(dev, non_blocking=True).view(-1, 1, 28, 28), yb.to(dev, non_blocking=True)
            for pg in opt.param_groups: pg['lr'] = sched(n_epochs / epochs)
            with ac():
                pred = model(xb)
                loss = loss_func(pred, yb)
            with torch.no_grad():
                bn = len(yb); tc += bn; tl += loss.detach() * bn
                for i, m in enumerate(metrics): tm[i] += m(pred, yb) * bn
            loss.backward()
            opt.step()
            opt.zero_grad()
            lrs.append(opt.param_groups[-1]['lr']); losses.append(loss.detach())
            n_epochs += 1. / iters
        model.eval()
        with torch.no_grad():
            vl, vm, vc = 0., [0.] * len(metrics), 0
            for xb, yb in data.valid_dl:
                xb, yb = xb.to(dev, non_blocking=True).view(-1, 1, 28, 28), yb.to(dev, non_blocking=True)
                with ac():
                    pred = model(xb)
                    loss = loss_func(pred, yb)
                bn = len(yb); vc += bn; vl += loss.detach() * bn
                for i, m in enumerate(metrics): vm[i] += m(pred, yb) * bn
        history.append((torch.stack([torch.as_tensor(o).float() for o in [tl, *tm]]) / tc).tolist()
                       + (torch.stack([torch.as_tensor(o).float() for o in [vl, *vm]]) / vc).tolist())
    return history, torch.stack(losses).float().tolist(), lrs

CASES.append(Case('l5cnn', l5_cnn, bs=128, n_train=(5_000, 30_000), lr=0.2, runner_cbs=l5_runner_cbs,
                  hand_setup=l5_hand_setup, hand_loop=l5_hand_fit))


def runner_fit(epochs, model, opt, loss_func, data, sched, extra_cbs=()):
    "(b): the same training through the Runner and its default callbacks."
    run = Runner(cbs=[Recorder(), AvgStatsCallback([accuracy], silent=True), ParamScheduler('lr', sched), *extra_cbs])
    run.fit(epochs, Learner(model, opt, loss_func, data))
    h = run.avg_stats.history
    return [[e['train_loss'], e['train_accuracy'], e['valid_loss'], e['valid_accuracy']] for e in h], run.recorder.losses, run.recorder.lrs


def bench_case(case, x, y, xv, yv, quick, reps, dataloader, clock):
    n = case.n_train[0] if quick else case.n_train[1]
    x, y = x[:n], y[:n]
    set_seed(0)
    model0 = case.make_model()
    sched = combine_scheds([0.3, 0.7], cos_1cycle_anneal(case.lr / 25, case.lr, case.lr / 1e4))
    def one(kind):
        model = copy.deepcopy(model0)
        opt = optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)
        data = make_data(x, y, xv, yv, case.bs, case.epochs, seed=1, dataloader=dataloader)
        if kind == 'a' and case.hand_setup: case.hand_setup(model, opt)
        t = clock()
        if kind == 'a': res = (case.hand_loop or hand_fit)(case.epochs, model, opt, F.cross_entropy, data, sched)
        else: res = runner_fit(case.epochs, model, opt, F.cross_entropy, data, sched, case.runner_cbs())
        return clock() - t, res, model
    one('a'); one('b')  # warm-up (allocator, first-call overheads)
    ta, tb, ra, rb = [], [], None, None
    for i in range(reps):  # alternate, and alternate which goes first, so drifts in machine load hit both alike
        for kind in ('ab' if i % 2 == 0 else 'ba'):
            t, r, m = one(kind)
            if kind == 'a': ta.append(t); ra, ma = r, m
            else: tb.append(t); rb, mb = r, m
    (ha, la, lra), (hb, lb, lrb) = ra, rb
    loss_diff = max(abs(p - q) for p, q in zip(la + ha[-1], lb + hb[-1]))
    w_diff = max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters()))
    ok = len(la) == len(lb) and lra == lrb and loss_diff <= 1e-6
    ratios = [b / a for a, b in zip(ta, tb)]
    n_batches = len(la) + case.epochs * len(range(0, len(xv), 2 * case.bs))
    over = (statistics.median(tb) - statistics.median(ta)) / n_batches * 1e6
    print(f'{case.name:>5} bs {case.bs:>3}: {len(la)} batches x {reps} runs each | '
          f'final train loss (a) {ha[-1][0]:.7f} (b) {hb[-1][0]:.7f}, valid loss (a) {ha[-1][2]:.7f} (b) {hb[-1][2]:.7f} '
          f'| max loss diff {loss_diff:.1e}, max weight diff {w_diff:.1e} {"OK" if ok else "MISMATCH"}')
    print(f'{"":>5}         time (a) median {statistics.median(ta):.3f}s  (b) median {statistics.median(tb):.3f}s | '
          f'ratio (b)/(a): median of pairs {statistics.median(ratios):.3f}, min/min {min(tb)/min(ta):.3f} '
          f'| Runner costs {over:+.1f} us per batch (train+valid)', flush=True)
    return ok, statistics.median(ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='smaller data and fewer runs (about a minute)')
    ap.add_argument('--threads', type=int, default=1, help='torch.set_num_threads for every run (default 1)')
    ap.add_argument('--reps', type=int, default=None, help='timed runs of each loop per case (default 9, quick 3)')
    ap.add_argument('--case', action='append', help='run only these cases (%s)' % ', '.join(c.name for c in CASES))
    ap.add_argument('--wall', action='store_true', help='time with the wall clock (default: CPU time of this process, '
                    'which other jobs on a shared machine disturb much less)')
    ap.add_argument('--dataloader', action='store_true', help="use lesson 2's DataLoaders instead of pre-made batches")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 9)
    x, y, xv, yv = get_data()
    m, s = x.mean(), x.std()
    x, xv = normalize(x, m, s), normalize(xv, m, s)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), '
          f'{"DataLoader" if args.dataloader else "pre-made batches"}, {"wall-clock" if args.wall else "CPU"} time, '
          f'{"quick" if args.quick else "full"}')
    cases = [c for c in CASES if not args.case or c.name in args.case]
    clock = time.perf_counter if args.wall else time.process_time
    res = [bench_case(c, x, y, xv, yv, args.quick, reps, args.dataloader, clock) for c in cases]
    if not all(ok for ok, _ in res): sys.exit('losses of (a) and (b) differ by more than 1e-6')

if __name__ == '__main__': main()
