import copy, os, random
from functools import partial
import numpy as np, pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import set_seed
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from course_lib.anneal import Recorder, SGDRCallback, ParamScheduler, sched_cos
from course_lib.resilience import *


def make_data(n_train=64, n_valid=32, bs=8, ni=6, seed=0, generator=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, ni, generator=g), torch.randint(0, 3, (n_train + n_valid,), generator=g)
    kw = {} if generator is None else dict(generator=generator)
    return DataBunch(*get_dls(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), bs, **kw), c=3)

def make_learn(data=None, p=0.2, lr=0.1, ni=6):
    model = nn.Sequential(nn.Linear(ni, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))
    return Learner(model, optim.SGD(model.parameters(), lr=lr, momentum=0.9), F.cross_entropy, data or make_data())

def raised(f):
    try: f()
    except BaseException as e: return e
    raise AssertionError('did not raise')

def max_diff(m1, m2): return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))

class Steps(Callback):
    def begin_fit(self): self.n = 0
    def after_step(self): self.n += 1

class Released(Callback):
    def begin_fit(self): self.done = False
    def after_fit(self): self.done = True


# --- errors from callbacks, edges of fit ---

def test_callback_error_keeps_type_and_names_callback_and_event():
    class Bad(Callback):
        def after_backward(self): raise KeyError('k')
    run = Runner(cbs=[Bad, Released])
    e = raised(lambda: run.fit(1, make_learn()))
    assert type(e) is KeyError and e.args == ('k',)
    assert e.__notes__ == ["Runner: raised by callback Bad in event 'after_backward'"]
    assert run.released.done and run.learn is None

def test_nested_event_names_the_innermost_callback_once():
    class OnCycle(Callback):
        def on_cycle_end(self): raise RuntimeError('cycle')
    e = raised(lambda: Runner(cbs=[SGDRCallback(0.1, n_cycles=1), OnCycle]).fit(1, make_learn()))
    assert e.__notes__ == ["Runner: raised by callback OnCycle in event 'on_cycle_end'"]

@pytest.mark.parametrize('exc', [CancelTrainException, CancelEpochException, CancelBatchException, KeyboardInterrupt])
def test_cancel_and_keyboard_interrupt_pass_through_without_note(exc):
    seen = []
    class Raise(Callback):
        def after_loss(self):
            if self.in_train and self.iter == 0 and not seen: seen.append(1); raise exc()
    run = Runner(cbs=[Raise, Released])
    if exc is KeyboardInterrupt:
        e = raised(lambda: run.fit(1, make_learn()))
        assert type(e) is KeyboardInterrupt and not getattr(e, '__notes__', None)
    else: run.fit(1, make_learn())
    assert run.released.done

def test_fit_rejects_empty_training_loader_and_bad_epochs():
    data = make_data()
    empty = DataBunch(torch.utils.data.DataLoader(Dataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), 8), data.valid_dl, 3)
    run = Runner(cbs=Released)
    with pytest.raises(ValueError, match=r'training loader has no batches \(0 items, batch size 8\)'): run.fit(1, make_learn(empty))
    assert not hasattr(run.released, 'done')  # refused before any callback ran
    for e in (0, -2, 2.0):
        with pytest.raises(ValueError, match=f'epochs={e}'): Runner().fit(e, make_learn())

def test_schedule_returning_non_number_fails_before_first_batch():
    run = Runner(cbs=[ParamScheduler('lr', lambda pos: None), Steps])
    with pytest.raises(TypeError, match='expected a finite real number'): run.fit(1, make_learn())
    assert run.steps.n == 0


# --- non-finite loss ---

def nan_at(epoch, batch):
    "A loss function returning nan at training batch `batch` of epoch `epoch` (counted per call in training mode)."
    state = {'e': 0, 'b': 0}
    class Pos(Callback):
        _order = -1
        def begin_batch(self): state['e'], state['b'], state['t'] = self.epoch, self.iter, self.in_train
    def lf(pred, yb):
        l = F.cross_entropy(pred, yb)
        return l * float('nan') if state.get('t') and (state['e'], state['b']) == (epoch, batch) else l
    return lf, Pos

@pytest.mark.parametrize('every', [None, 1, 3, 100])
def test_terminate_on_nan_names_epoch_and_first_bad_batch(every):
    lf, Pos = nan_at(1, 4)
    learn = make_learn()
    learn.loss_func = lf
    run = Runner(cbs=[Pos, partial(TerminateOnNanCallback, every=every), Steps, Released])
    with pytest.raises(NonFiniteLossError, match=r'epoch 1, batch 4 \(of 8\)'): run.fit(3, learn)
    k = every or 1
    checks = [j for j in range(4, 8) if (j + 1) % k == 0]
    assert run.steps.n == 8 + (checks[0] if checks else 8)  # steps before the check that saw it (or the whole pass)
    assert run.released.done
    if k == 1: assert all(p.isfinite().all() for p in learn.model.parameters())

def test_terminate_on_nan_ignores_validation_and_does_not_sync_per_batch(monkeypatch):
    def counted(n_train):
        learn = make_learn(make_data(n_train=n_train))
        counts = {'n': 0}
        orig = torch.Tensor.__int__
        def spy(self): counts['n'] += 1; return orig(self)
        monkeypatch.setattr(torch.Tensor, '__int__', spy)
        Runner(cbs=TerminateOnNanCallback(every=1000)).fit(2, learn)
        monkeypatch.undo()
        return counts['n']
    assert counted(64) == counted(256) == 2  # one read per training pass, whatever the number of batches
    learn = make_learn()
    learn.loss_func = lambda pred, yb: F.cross_entropy(pred, yb) * (1. if learn.model.training else float('inf'))
    Runner(cbs=TerminateOnNanCallback).fit(1, learn)  # inf validation loss only: no error
    with pytest.raises(ValueError, match='every=0'): TerminateOnNanCallback(every=0)


# --- shapes, OOM, accumulation ---

def reg_learn(lf, n=32):
    data = DataBunch(*get_dls(Dataset(torch.randn(n, 4), torch.randn(n)), Dataset(torch.randn(8, 4), torch.randn(8)), 8), c=1)
    model = nn.Linear(4, 1)
    return Learner(model, optim.SGD(model.parameters(), lr=0.01), lf, data)

def test_shape_check_catches_broadcasting_non_scalar_and_wrong_classes():
    with pytest.raises(ValueError, match=r'output of shape \(8, 1\) and targets of shape \(8,\) do not fit the loss function mse_loss'):
        Runner(cbs=ShapeCheckCallback).fit(1, reg_learn(F.mse_loss))
    with pytest.raises(ValueError, match=r'returned \(8,\), expected one number'):
        Runner(cbs=ShapeCheckCallback).fit(1, reg_learn(lambda p, y: (p[:, 0] - y) ** 2))
    learn = make_learn()
    learn.model[-1] = nn.Linear(16, 2)  # 2 outputs, labels up to 2
    bad = Learner(learn.model, optim.SGD(learn.model.parameters(), 0.1), F.cross_entropy, make_data(generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r'output of shape \(8, 2\) and targets of shape \(8,\) do not fit the loss function cross_entropy'):
        Runner(cbs=ShapeCheckCallback).fit(1, bad)

def test_shape_check_runs_once():
    calls = []
    def lf(p, y): calls.append(1); return F.mse_loss(p[:, 0], y)
    Runner(cbs=ShapeCheckCallback).fit(2, reg_learn(lf))
    assert len(calls) == 1 + 2 * (4 + 1)  # one extra call, on the first batch

class OOMAt(nn.Module):
    def __init__(self, at): super().__init__(); self.lin, self.n, self.at = nn.Linear(6, 3), 0, at
    def forward(self, x):
        self.n += 1
        if self.n == self.at: raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.00 GiB')
        return self.lin(x)

@pytest.mark.parametrize('at,where,bs', [(3, 'training batch 2, batch size 8', 8), (10, 'validation batch 1, batch size 16', 16)])
def test_oom_note_names_batch_size_and_hint(at, where, bs):
    model = OOMAt(at)
    run = Runner(cbs=[OOMHintCallback, Released])
    e = raised(lambda: run.fit(1, Learner(model, optim.SGD(model.parameters(), 0.1), F.cross_entropy, make_data())))
    assert type(e) is torch.cuda.OutOfMemoryError and len(e.__notes__) == 1
    assert where in e.__notes__[0] and f'bs {bs // 2} and GradientAccumulation(2)' in e.__notes__[0]
    assert run.released.done

def test_oom_hint_leaves_other_errors_alone():
    class Boom(nn.Module):
        def forward(self, x): raise RuntimeError('other')
    e = raised(lambda: Runner(cbs=OOMHintCallback).fit(1, Learner(Boom(), optim.SGD(nn.Linear(1, 1).parameters(), 0.1), F.cross_entropy, make_data())))
    assert type(e) is RuntimeError and not getattr(e, '__notes__', None)

def accum_fit(model, bs, cbs, epochs=2):
    data = make_data(n_train=256, bs=bs, generator=torch.Generator().manual_seed(3))
    learn = Learner(model, optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2), F.cross_entropy, data)
    run = Runner(cbs=[Steps] + cbs)
    run.fit(epochs, learn)
    return run

def test_gradient_accumulation_2x32_equals_64():
    m = make_learn(p=0.).model
    m64, m32 = copy.deepcopy(m), copy.deepcopy(m)
    r64, r32 = accum_fit(m64, 64, []), accum_fit(m32, 32, [GradientAccumulation(2)])
    assert r64.steps.n == r32.steps.n == 8 and r32.n_iter == 16
    assert max_diff(m64, m32) < 1e-6
    m32b = copy.deepcopy(m)
    accum_fit(m32b, 32, [])
    assert max_diff(m64, m32b) > 1e-3

def test_gradient_accumulation_steps_at_end_of_uneven_pass():
    data = make_data(n_train=40, bs=8)  # 5 batches: steps after 2, 4 and 5
    run = Runner(cbs=[Steps, GradientAccumulation(2)])
    run.fit(2, make_learn(data))
    assert run.steps.n == 6 and run.n_iter == 10
    with pytest.raises(ValueError, match='n=0'): GradientAccumulation(0)
    with pytest.raises(ValueError, match='n=True'): GradientAccumulation(True)


# --- checkpoints and resume ---

def ck_cbs(path, **kw):
    return [Recorder, partial(AvgStatsCallback, accuracy, silent=True), partial(ParamScheduler, 'lr', sched_cos(0.1, 0.01)),
            partial(Checkpoint, path, **kw)]

class StopAfter(Callback):
    _order = 100
    def __init__(self, epoch, exc=KeyboardInterrupt): self.stop_epoch, self.exc = epoch, exc
    def after_epoch(self):
        if self.epoch == self.stop_epoch: raise self.exc()

@pytest.mark.parametrize('own_generator', [False, True])
def test_resume_after_epoch_2_of_4_is_exact(tmp_path, own_generator):
    def learn_for(seed):
        set_seed(seed)
        gen = torch.Generator().manual_seed(11) if own_generator else None
        return make_learn(make_data(generator=gen))
    la, lb = learn_for(0), learn_for(0)
    set_seed(5); ra = Runner(cbs=ck_cbs(tmp_path/'a')); ra.fit(4, la)
    set_seed(5); rb = Runner(cbs=ck_cbs(tmp_path/'b') + [partial(StopAfter, 1)])
    with pytest.raises(KeyboardInterrupt): rb.fit(4, lb)
    lc = learn_for(99)  # another init, other RNG states, a new loader generator: all overwritten
    if own_generator: lc.data.train_dl.generator.manual_seed(12345)
    rc = Runner(cbs=ck_cbs(tmp_path/'b', resume=True))
    rc.fit(4, lc)
    assert max_diff(la.model, lc.model) <= 1e-6
    assert rc.recorder.losses == pytest.approx(ra.recorder.losses, abs=1e-6) and len(rc.recorder.losses) == 4 * 8
    assert rc.recorder.lrs == ra.recorder.lrs
    assert [h['epoch'] for h in rc.avg_stats.history] == [0, 1, 2, 3]
    for ha, hc in zip(ra.avg_stats.history, rc.avg_stats.history): assert hc == pytest.approx(ha, abs=1e-6)
    assert (rc.n_iter, rc.epoch) == (ra.n_iter, ra.epoch)

def test_checkpoint_file_is_weights_only_and_holds_everything(tmp_path):
    run = Runner(cbs=ck_cbs(tmp_path))
    run.fit(2, make_learn(make_data(generator=torch.Generator().manual_seed(1))))
    sd = torch.load(tmp_path/'epoch_001.pth', weights_only=True)
    assert set(CKPT_KEYS) <= set(sd) and sd['epoch'] == 1 and sd['n_iter'] == 16 and sd['n_epochs'] == pytest.approx(2.)
    assert set(sd['rng']) >= {'torch', 'numpy', 'python'} and len(sd['generators']) == 1
    assert set(sd['cbs']) == {'recorder', 'avg_stats', 'checkpoint'} and sd['cbs']['recorder']['losses'].shape == (16,)
    assert len(sd['cbs']['avg_stats']['history']) == 2 and sd['opt']['state']  # momentum buffers

def test_keep_best_and_cycle_checkpoints(tmp_path):
    class Acc(Callback):  # a fake validation metric per epoch, to know the best epoch in advance
        _order = 1
        def after_epoch(self): self.run.avg_stats.history[-1]['valid_accuracy'] = [0.5, 0.9, 0.7, 0.8, 0.6, 0.85, 0.1][self.epoch]
    run = Runner(cbs=[partial(AvgStatsCallback, accuracy, silent=True), Acc, SGDRCallback(0.1, n_cycles=3),
                      partial(Checkpoint, tmp_path, keep=2, monitor='valid_accuracy')])
    run.fit(7, make_learn())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best.pth', 'cycle_0.pth', 'cycle_1.pth', 'cycle_2.pth', 'epoch_005.pth', 'epoch_006.pth']
    assert read_checkpoint(tmp_path/'best.pth')['epoch'] == 1
    assert [read_checkpoint(tmp_path/f'cycle_{i}.pth')['epoch'] for i in range(3)] == [0, 2, 6]
    assert Checkpoint(tmp_path, monitor='valid_loss').mode == 'min' and Checkpoint(tmp_path, monitor='valid_accuracy').mode == 'max'
    run = Runner(cbs=[AvgStatsCallback(accuracy, silent=True), Checkpoint(tmp_path/'x', monitor='nope'), Steps])
    with pytest.raises(KeyError, match="monitor='nope' is not a statistic of AvgStatsCallback"): run.fit(1, make_learn())
    assert run.steps.n == 0  # refused before training
    with pytest.raises(KeyError, match='add AvgStatsCallback'): Runner(cbs=Checkpoint(tmp_path/'x')).fit(1, make_learn())
    for bad in (dict(keep=0), dict(mode='up')):
        with pytest.raises(ValueError): Checkpoint(tmp_path, **bad)

def _snap(learn): return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())

def _same(learn, snap):
    w, o = snap
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, w[k]), k
    assert str(learn.opt.state_dict()) == str(o)

def test_corrupt_truncated_or_mismatched_checkpoint_leaves_model_untouched(tmp_path):
    Runner(cbs=ck_cbs(tmp_path/'ok')).fit(1, make_learn())
    good = tmp_path/'ok'/'epoch_000.pth'
    raw = good.read_bytes()
    (tmp_path/'trunc.pth').write_bytes(raw[:len(raw) // 3])
    (tmp_path/'junk.pth').write_bytes(b'\x00' * 500)
    torch.save({'model': {}}, tmp_path/'partial.pth')
    sd = torch.load(good, weights_only=True)
    sd['opt']['param_groups'][0]['params'] = sd['opt']['param_groups'][0]['params'][:-1]
    torch.save(sd, tmp_path/'opt_mismatch.pth')
    sd = torch.load(good, weights_only=True)
    sd['rng']['torch'] = sd['rng']['torch'][:10]
    torch.save(sd, tmp_path/'bad_rng.pth')
    sd = torch.load(good, weights_only=True)
    sd['opt']['state'][0]['momentum_buffer'] = torch.zeros(2, 2)
    torch.save(sd, tmp_path/'bad_state.pth')
    learn = make_learn()
    Runner().fit(1, learn)  # some optimizer state to protect
    snap, rng = _snap(learn), torch.get_rng_state()
    for name, msg in [('trunc.pth', 'cannot read the checkpoint'), ('junk.pth', 'cannot read the checkpoint'), ('partial.pth', 'missing'),
                      ('opt_mismatch.pth', 'parameter groups of sizes'), ('bad_rng.pth', 'invalid checkpoint'), ('bad_state.pth', "'momentum_buffer'")]:
        with pytest.raises(CheckpointError, match=msg) as ei: Runner(cbs=Checkpoint(tmp_path/'new', monitor=None, resume=tmp_path/name)).fit(1, learn)
        assert name in str(ei.value)
        _same(learn, snap)
        assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(CheckpointError): load_weights(learn.model, tmp_path/'trunc.pth')
    with pytest.raises(FileNotFoundError): read_checkpoint(tmp_path/'none.pth')
    _same(learn, snap)

def test_interrupt_mid_fit_and_mid_save_leave_last_checkpoint_intact(tmp_path, monkeypatch):
    class CtrlCAt(Callback):
        def after_batch(self):
            if self.epoch == 2 and self.iter == 3: raise KeyboardInterrupt()
    run = Runner(cbs=ck_cbs(tmp_path) + [CtrlCAt, Released])
    with pytest.raises(KeyboardInterrupt): run.fit(4, make_learn())
    assert run.released.done
    last = tmp_path/'epoch_001.pth'
    assert read_checkpoint(last)['epoch'] == 1 and not (tmp_path/'epoch_002.pth').exists()
    raw = last.read_bytes()
    def half_save(obj, f, *a, **k): f.write(b'partial'); raise KeyboardInterrupt()
    monkeypatch.setattr(torch, 'save', half_save)
    class Again(Callback):  # rerun epoch 1's save, interrupted half-way
        _order = 60
        def begin_fit(self): self.run.start_epoch = 1
    with pytest.raises(KeyboardInterrupt): Runner(cbs=ck_cbs(tmp_path) + [Again]).fit(2, make_learn())
    monkeypatch.undo()
    assert last.read_bytes() == raw and not [p for p in tmp_path.iterdir() if p.name.startswith('.')]

def test_resume_with_no_checkpoint_starts_fresh_and_finished_run_does_nothing(tmp_path):
    run = Runner(cbs=ck_cbs(tmp_path, resume=True) + [Steps])
    run.fit(2, make_learn())
    assert run.steps.n == 16 and run.start_epoch == 0
    run = Runner(cbs=ck_cbs(tmp_path, resume=True) + [Steps])
    run.fit(2, make_learn())
    assert run.steps.n == 0 and run.start_epoch == 2 and len(run.recorder.losses) == 16

def test_rng_states_round_trip_through_checkpoint(tmp_path):
    run = Runner(cbs=ck_cbs(tmp_path))
    run.fit(1, make_learn())
    after = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    learn = make_learn()
    Runner(cbs=[Recorder, partial(AvgStatsCallback, accuracy, silent=True), partial(Checkpoint, tmp_path, resume=True)]).fit(1, learn)
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], again[0]) and after[1:] == again[1:]


def test_interrupt_mid_batch_releases_hooks_autocast_and_progress_bar(capsys):
    from course_lib.hooks import HooksCallback, MixedPrecision, ProgressCallback
    class CtrlC(Callback):
        _order = 11  # inside the autocast region of MixedPrecision (entered at begin_batch, order 10)
        def after_pred(self):
            if self.n_iter == 5: raise KeyboardInterrupt()
    learn = make_learn()
    run = Runner(cbs=[HooksCallback(), MixedPrecision(), partial(ProgressCallback, show=True), CtrlC, partial(AvgStatsCallback, accuracy)])
    with pytest.raises(KeyboardInterrupt): run.fit(2, learn)
    assert sum(len(m._forward_hooks) for m in learn.model.modules()) == 0
    assert not torch.is_autocast_enabled('cpu')
    assert run.progress.mbar is None and run.progress.pb is None and run.learn is None


def test_note_for_a_handler_set_on_the_instance():
    cb = Callback()
    def boom(): raise ValueError('x')
    cb.after_loss = boom
    e = raised(lambda: Runner(cbs=cb).fit(1, make_learn()))
    assert type(e) is ValueError and e.__notes__ == ["Runner: raised by callback Callback in event 'after_loss'"]
