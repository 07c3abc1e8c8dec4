import math
from functools import partial
import numpy as np, pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import listify
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from course_lib.anneal import *
import conftest
from conftest import HostReads, DEVICE

make_data = partial(conftest.make_data, n_train=40, n_valid=10, bs=4)

def bn_model(ni=6, nh=8):
    return nn.Sequential(nn.Linear(ni, nh), nn.BatchNorm1d(nh), nn.ReLU(), nn.Dropout(0.1), nn.Linear(nh, 3))

def two_group_opt(model, cls=optim.SGD, **kw):
    return cls([{'params': model[0].parameters(), 'lr': 0.01}, {'params': list(model[1].parameters()) + list(model[4].parameters()), 'lr': 0.1}], **kw)


# --- schedules ---

@pytest.mark.parametrize('f,mid', [(sched_lin, 5.), (sched_cos, 5.), (sched_no, 2.), (sched_exp, 4.)])
def test_schedules_at_0_half_1(f, mid):
    s = f(2., 8.)
    assert s(0.) == pytest.approx(2.)
    assert s(0.5) == pytest.approx(mid)
    assert s(1.) == pytest.approx(2. if f is sched_no else 8.)

def test_sched_cos_is_flat_at_ends():
    s = sched_cos(0., 1.)
    assert s(0.01) < 0.001 and s(0.99) > 0.999

def test_combine_scheds_rejects_bad_pcts():
    scheds = cos_1cycle_anneal(0.1, 1., 0.)
    with pytest.raises(ValueError, match=r'sum to 0.9, expected 1'): combine_scheds([0.3, 0.6], scheds)
    with pytest.raises(ValueError, match='negative'): combine_scheds([1.1, -0.1], scheds)
    with pytest.raises(ValueError, match='2 pcts for 3 schedules'): combine_scheds([0.5, 0.5], scheds + [sched_no(0, 0)])

def test_combine_scheds_continuous_at_joins_and_zero_shares():
    s = combine_scheds([0.25, 0., 0.5, 0.25], [sched_lin(0, 1), sched_no(5, 5), sched_cos(1, 3), sched_exp(3, 0.03)])
    for j in (0.25, 0.75):
        assert s(j - 1e-9) == pytest.approx(s(j), abs=1e-6) and s(j + 1e-9) == pytest.approx(s(j), abs=1e-6)
    assert [s(0.), s(0.25), s(0.75), s(1.)] == pytest.approx([0., 1., 3., 0.03])
    assert all(isinstance(s(p / 100), float) for p in range(101))
    assert 5. not in [s(p / 100) for p in range(101)]  # the zero-share piece is never used

def test_one_cycle_shape():
    s = combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.01, 1., 1e-4))
    assert [s(0.), s(0.3), s(1.)] == pytest.approx([0.01, 1., 1e-4])


# --- ParamScheduler and Recorder ---

def test_param_scheduler_each_group_own_schedule():
    model = bn_model()
    opt = two_group_opt(model, momentum=0.9)
    lin, cos = sched_lin(0.01, 0.001), sched_cos(0.2, 0.02)
    run = Runner(cbs=[Recorder(), ParamScheduler('lr', [lin, cos]), ParamScheduler('momentum', sched_lin(0.8, 0.9))])
    run.fit(2, Learner(model, opt, F.cross_entropy, make_data()))
    rec, n = run.recorder, run.n_iter
    assert n == 20
    pos = [i / 20 for i in range(20)]
    assert rec.lrs[0] == pytest.approx([lin(p) for p in pos])
    assert rec.lrs[1] == pytest.approx([cos(p) for p in pos])
    assert all(pg['momentum'] == pytest.approx(sched_lin(0.8, 0.9)(19 / 20)) for pg in opt.param_groups)

def test_param_scheduler_checks_inputs():
    learn = lambda: Learner(bn_model(), two_group_opt(bn_model()), F.cross_entropy, make_data())
    with pytest.raises(ValueError, match='3 schedules for 2 parameter groups'): Runner(cbs=ParamScheduler('lr', [sched_no(1, 1)] * 3)).fit(1, learn())
    with pytest.raises(KeyError, match="'mom' is not a hyper-parameter of SGD"): Runner(cbs=ParamScheduler('mom', sched_no(1, 1))).fit(1, learn())
    for bad in (lambda p: torch.tensor([0.1]), lambda p: None, lambda p: '0.1', lambda p: float('nan'), lambda p: torch.tensor(float('inf')), lambda p: True):
        with pytest.raises(TypeError, match='expected a finite real number'): Runner(cbs=ParamScheduler('lr', bad)).fit(1, learn())

def course_combine_scheds(pcts, scheds):
    "The 2019 course's `combine_scheds`, verbatim: tensor arithmetic, so its schedules return 0-d tensors (and it fails at pos=1)."
    assert sum(pcts) == 1.
    pcts = torch.tensor([0] + listify(pcts))
    assert torch.all(pcts >= 0)
    pcts = torch.cumsum(pcts, 0)
    def _inner(pos):
        idx = (pos >= pcts).nonzero().max()
        actual_pos = (pos-pcts[idx]) / (pcts[idx+1]-pcts[idx])
        return scheds[idx](actual_pos)
    return _inner

def test_param_scheduler_accepts_any_real_scalar():
    lrs = torch.linspace(0.1, 0.01, 40)
    scheds = {'linspace': lambda pos: lrs[int(pos * 40)], 'cos': lambda pos: 0.05 + 0.05 * torch.cos(torch.tensor(pos) * math.pi),
              'numpy': lambda pos: np.float32(0.1 - 0.05 * pos), 'int': lambda pos: 1,
              'course': course_combine_scheds([0.3, 0.7], [sched_lin(0.01, 0.1), sched_lin(0.1, 0.01)])}
    for name, f in scheds.items():
        assert isinstance(f(0.5), (torch.Tensor, np.floating, int)), name
        model = bn_model()
        run = Runner(cbs=[Recorder(), ParamScheduler('lr', f)])
        run.fit(1, Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, make_data()))
        assert all(type(o) is float for o in run.recorder.lrs[-1]), name
        pos = [sum([0.1] * i) for i in range(10)]  # n_epochs, summed batch by batch as TrainEvalCallback does
        assert run.recorder.lrs[-1] == pytest.approx([float(f(p)) for p in pos]), name

def test_recorder_keeps_tensors_and_converts_lazily():
    run = Runner(cbs=[Recorder, partial(AvgStatsCallback, accuracy, silent=True)])
    run.fit(2, Learner(bn_model(), optim.SGD(bn_model().parameters(), 0.1), F.cross_entropy, make_data()))
    rec = run.recorder
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in rec._losses)
    assert len(rec.losses) == len(rec.lrs[-1]) == run.n_iter == 20
    assert all(type(o) is float for o in rec.losses + rec.lrs[-1])


def test_default_callbacks_sync_a_number_of_times_independent_of_batches(host_reads):
    from course_lib.cuda import DeviceCallback
    def syncs(n_train):
        model = bn_model()
        learn = Learner(model, optim.SGD(model.parameters(), 0.1, momentum=0.9), F.cross_entropy, make_data(n_train=n_train, n_valid=n_train))
        cbs = [DeviceCallback(DEVICE), Recorder(), AvgStatsCallback(accuracy, silent=True),
               ParamScheduler('lr', combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.01, 0.1, 0.001)))]
        reads = HostReads(host_reads.cs)
        Runner(cbs=cbs + reads.cbs).fit(2, learn)
        return reads.n, reads.in_batches
    n, n3 = syncs(40), syncs(120)
    assert n == n3 and n[1] == 0, (n, n3)  # none per batch; the epoch's statistics, read once each


# --- SGDR ---

def test_sgdr_fires_after_cycle_after_each_cycle():
    class Log(Callback):
        _order = 5
        def begin_fit(self): self.ends = []
        def after_cycle(self): self.ends.append((self.cycle, self.epoch))
    model = bn_model()
    run = Runner(cbs=[Recorder(), SGDRCallback(0.1, 0.001, n_cycles=3, cycle_len=1, cycle_mult=2), Log()])
    run.fit(7, Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, make_data()))
    assert run.log.ends == [(0, 0), (1, 2), (2, 6)]
    lrs = run.recorder.lrs[-1]
    assert [lrs[i] for i in (0, 10, 30)] == pytest.approx([0.1] * 3)  # restarts
    assert lrs[9] < 0.004 and lrs[29] < 0.002 and lrs[69] < 0.002  # the last batch of each cycle is close to min_lr
    assert SGDRCallback(0.1).ends == [1, 2, 3] and sgdr_cycles(4) == [1, 1, 1, 1]  # fastai 0.7's default: cycle_mult=1
    with pytest.raises(ValueError, match=r'expected fit\(3'): Runner(cbs=SGDRCallback(0.1)).fit(6, Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, make_data()))
    with pytest.raises(ValueError, match='cycle_len=0'): sgdr_cycles(2, cycle_len=0)


# --- LR finder ---

def _snapshot(model, opt):
    "Every tensor and setting lr_find could touch, as plain copies."
    ts = {('t', k): v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    ts.update({('g', k): None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()})
    for i, p in enumerate(opt.param_groups[0]['params'] + opt.param_groups[-1]['params']):
        for k, v in opt.state.get(p, {}).items(): ts[('s', i, k)] = v.clone() if torch.is_tensor(v) else v
    groups = [{k: v for k, v in pg.items() if k != 'params'} for pg in opt.param_groups]
    modes = [m.training for m in model.modules()]
    return ts, groups, modes

def _assert_same(a, b):
    (ta, ga, ma), (tb, gb, mb) = a, b
    assert ta.keys() == tb.keys() and ga == gb and ma == mb
    for k in ta:
        if ta[k] is None or tb[k] is None: assert ta[k] is tb[k] is None, k
        elif torch.is_tensor(ta[k]): assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        else: assert ta[k] == tb[k], k

@pytest.mark.parametrize('cls,kw', [(optim.SGD, dict(momentum=0.9, weight_decay=1e-4)), (optim.Adam, {})])
def test_lr_find_restores_everything(cls, kw):
    model = bn_model()
    data = make_data(n_train=80, bs=8)
    opt = two_group_opt(model, cls, **kw)
    Runner().fit(1, Learner(model, opt, F.cross_entropy, data))  # some optimizer state and BN statistics first
    xb, yb = next(iter(data.train_dl))
    F.cross_entropy(model(xb), yb).backward()  # and pending gradients
    model.eval(); model[1].train()              # and mixed modes
    before = _snapshot(model, opt)
    assert int(model[1].num_batches_tracked) > 0 and any(k[0] == 's' for k in before[0])
    rec = lr_find(Learner(model, opt, F.cross_entropy, data), max_iter=30, min_lr=1e-4, max_lr=100)
    assert 2 <= len(rec.lrs[-1]) <= 30
    after = _snapshot(model, opt)
    _assert_same(before, after)

def test_lr_find_sweep_is_exponential_and_stops_on_explosion():
    model = bn_model()
    data = make_data(n_train=400, bs=8)
    rec = lr_find(Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, data), max_iter=100, min_lr=1e-3, max_lr=1e4)
    lrs, losses = rec.lrs[-1], rec.losses
    assert lrs[0] == pytest.approx(1e-3)
    assert [lrs[i + 1] / lrs[i] for i in range(len(lrs) - 1)] == pytest.approx([(1e7) ** (1 / 99)] * (len(lrs) - 1))
    assert len(lrs) < 100 and (losses[-1] > 10 * min(losses[:-1]) or not math.isfinite(losses[-1]))

def test_lr_find_bad_args_and_preserved_on_exception():
    with pytest.raises(ValueError, match='expected 0 < min_lr < max_lr'): LR_Find(min_lr=1., max_lr=0.1)
    with pytest.raises(ValueError, match='max_iter=1'): LR_Find(max_iter=1)
    model = bn_model()
    opt = optim.SGD(model.parameters(), 0.1, momentum=0.9)
    learn = Learner(model, opt, F.cross_entropy, make_data())
    before = _snapshot(model, opt)
    class Boom(Callback):
        def after_step(self):
            if self.n_iter == 3: raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'):
        with preserved(learn): Runner(cbs=Boom).fit(1, learn)
    _assert_same(before, _snapshot(model, opt))


# --- lr_find then fit is fit alone (issue 12): RNG states and loader generators are restored too

def _fit_weights(with_lr_find, shared_generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))  # dropout draws from the global RNG
    kw = dict(generator=torch.Generator().manual_seed(1)) if shared_generator else {}
    data = conftest.make_data(n_train=80, n_valid=16, bs=8, **kw)  # with a generator, both loaders share it
    learn = Learner(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, data)
    if with_lr_find: lr_find(learn, max_iter=15, min_lr=1e-4, max_lr=1.)
    Runner().fit(2, learn)
    return [p.detach().clone() for p in model.parameters()]

@pytest.mark.parametrize('shared_generator', [False, True])
def test_lr_find_then_fit_equals_fit_alone(shared_generator):
    for a, b in zip(_fit_weights(True, shared_generator), _fit_weights(False, shared_generator)): assert torch.equal(a, b)

class _Counts(Callback):
    _order = -1  # before LR_Find, which stops the fit in after_loss and after_step
    def begin_fit(self): self.steps,self.valid = 0,0
    def after_step(self): self.steps += 1
    def after_loss(self): self.valid += not self.in_train

def test_lr_find_takes_max_iter_steps_and_never_steps_on_an_exploded_loss():
    model = bn_model()
    learn = Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, make_data(n_train=80, bs=8))  # 10 batches an epoch
    counts = _Counts()
    rec = lr_find(learn, max_iter=25, min_lr=1e-6, max_lr=1e-5, cbs=counts)  # too gentle to explode; 3 epochs
    assert (counts.steps, len(rec.lrs[-1]), counts.valid) == (25, 25, 0)
    assert rec.lrs[-1][-1] == pytest.approx(1e-5) and rec.lrs[-1][0] == pytest.approx(1e-6)
    counts = _Counts()
    rec = lr_find(learn, max_iter=100, min_lr=1e-2, max_lr=1e6, cbs=counts)
    assert len(rec.lrs[-1]) < 100 and counts.steps == len(rec.lrs[-1]) - 1
    assert rec.losses[-1] > 10 * min(rec.losses[:-1]) or not math.isfinite(rec.losses[-1])

# --- the 2018 fit, once (issue 21)

def test_fit_sgdr_trains_to_the_weights_of_the_runner_spelled_out():
    from course_lib.anneal import fit_sgdr, SGDW
    def learner(opt_func):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        return Learner(model, opt_func(model.parameters(), lr=0.5), F.cross_entropy, make_data(seed=0, generator=torch.Generator().manual_seed(5)))
    a, b = learner(SGDW), learner(SGDW)
    run = fit_sgdr(a, 0.1, 3, cycle_len=1, cycle_mult=2, wds=1e-3, metrics=accuracy, silent=True)
    for pg in b.opt.param_groups: pg['lr'], pg['weight_decay'] = 0.1, 1e-3
    Runner([AvgStatsCallback(accuracy, silent=True), SGDRCallback(0.1, 0., 3, cycle_len=1, cycle_mult=2)]).fit(7, b)
    for p, q in zip(a.model.parameters(), b.model.parameters()): assert torch.equal(p, q)
    assert len(run.avg_stats.history) == 7 and 'valid_accuracy' in run.avg_stats.history[-1]
    c = learner(partial(optim.Adam))
    rec = fit_sgdr(c, [0.01], 2, wds=1e-5, cbs=[Recorder()], silent=True).recorder
    assert set(rec.lrs[-1]) == {0.01} and len(rec.lrs[-1]) == 2 * len(c.data.train_dl) and c.opt.param_groups[0]['weight_decay'] == 1e-5
    with pytest.raises(ValueError, match='n_cycle=0'): fit_sgdr(c, 0.01, 0)
    with pytest.raises(ValueError, match='2 values of lr for 1 parameter groups'): fit_sgdr(c, [0.1, 0.2], 1)

_LR_FIND_GPU = r'''
import torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import set_seed
from course_lib.training import Dataset, get_dls
from course_lib.callbacks import DataBunch, Learner, Runner
from course_lib.anneal import lr_find
from course_lib.cuda import DeviceCallback
def fit(find):
    set_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    data = DataBunch(*get_dls(Dataset(x[:64], y[:64]), Dataset(x[64:], y[64:]), 16), c=3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    learn = Learner(model, optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, data)
    if find: lr_find(learn, max_iter=6, cbs=[DeviceCallback('cuda')])  # CUDA starts inside the finder
    Runner([DeviceCallback('cuda')]).fit(2, learn)
    return [p.detach().cpu() for p in model.parameters()]
a, b = fit(True), fit(False)
print('SAME' if all(torch.equal(p, q) for p, q in zip(a, b)) else 'DIFFERENT')
'''

def test_lr_find_puts_back_the_gpu_generator_even_when_cuda_starts_inside_it(tmp_path):
    "A fit after the LR finder is the fit without it on a GPU box too: the finder's dropout draws on the GPU's generator."
    import os, subprocess, sys
    from pathlib import Path
    standin = Path(__file__).resolve().parent.parent/'tools'/'standin'
    (tmp_path/'f.py').write_text(_LR_FIND_GPU)
    env = {**os.environ, 'COURSE_STANDIN': 'cuda', 'PYTHONPATH': os.pathsep.join([str(standin), os.environ.get('PYTHONPATH', '')])}
    env.pop('COURSE_DEVICE', None)
    r = subprocess.run([sys.executable, str(tmp_path/'f.py')], capture_output=True, text=True, timeout=300, env=env)
    assert r.stdout.strip().endswith('SAME'), r.stdout + r.stderr[-2000:]
