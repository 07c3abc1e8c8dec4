import copy, os, random
from functools import partial
import numpy as np, pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import set_seed
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from course_lib.anneal import Recorder, SGDRCallback, ParamScheduler, sched_cos
from conftest import make_data, make_learn, raised, max_diff, Steps, Released
from course_lib.safety import *


def test_callback_error_keeps_type_and_names_callback_and_event():
    class Bad(Callback):
        def after_backward(self): raise KeyError('k')
    run = Runner(cbs=[Bad, Released])
    e = raised(lambda: run.fit(1, make_learn()))
    assert type(e) is KeyError and e.args == ('k',)
    assert e.__notes__ == ["Runner: raised by callback Bad in event 'after_backward'"]
    assert run.released.done

def test_nested_event_names_the_innermost_callback_once():
    class OnCycle(Callback):
        def after_cycle(self): raise RuntimeError('cycle')
    e = raised(lambda: Runner(cbs=[SGDRCallback(0.1, n_cycles=1), OnCycle]).fit(1, make_learn()))
    assert e.__notes__ == ["Runner: raised by callback OnCycle in event 'after_cycle'"]

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

def test_terminate_on_nan_ignores_validation_and_does_not_sync_per_batch(host_reads):
    from conftest import HostReads, DEVICE
    from course_lib.cuda import DeviceCallback
    def counted(n_train):
        learn = make_learn(make_data(n_train=n_train))
        reads = HostReads(host_reads.cs)
        Runner(cbs=[DeviceCallback(DEVICE), TerminateOnNanCallback(every=1000)] + reads.cbs).fit(2, learn)
        return reads.n
    assert counted(64) == counted(256) == 2  # one read per training pass, whatever the number of batches
    learn = make_learn()
    learn.loss_func = lambda pred, yb: F.cross_entropy(pred, yb) * (1. if learn.model.training else float('inf'))
    Runner(cbs=TerminateOnNanCallback).fit(1, learn)  # inf validation loss only: no error
    with pytest.raises(ValueError, match='every=0'): TerminateOnNanCallback(every=0)

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

def test_interrupt_mid_batch_releases_hooks_autocast_and_progress_bar(capsys):
    from course_lib.hooks import HooksCallback
    from course_lib.accel import MixedPrecision
    from course_lib.progress import ProgressCallback
    class CtrlC(Callback):
        _order = 11  # inside the autocast region of MixedPrecision (entered at begin_batch, order 10)
        def after_pred(self):
            if self.n_iter == 5: raise KeyboardInterrupt()
    learn = make_learn()
    run = Runner(cbs=[HooksCallback(), MixedPrecision(), partial(ProgressCallback, show=True), CtrlC, partial(AvgStatsCallback, accuracy)])
    with pytest.raises(KeyboardInterrupt): run.fit(2, learn)
    assert sum(len(m._forward_hooks) for m in learn.model.modules()) == 0
    assert not torch.is_autocast_enabled('cpu')
    assert run.progress.mbar is None and run.progress.pb is None

def test_note_for_a_handler_set_on_the_instance():
    cb = Callback()
    def boom(): raise ValueError('x')
    cb.after_loss = boom
    e = raised(lambda: Runner(cbs=cb).fit(1, make_learn()))
    assert type(e) is ValueError and e.__notes__ == ["Runner: raised by callback Callback in event 'after_loss'"]
