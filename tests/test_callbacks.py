import copy, pickle
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from conftest import HostReads, DEVICE, make_data


def make_learn(n_train=40, n_valid=10, bs=4, ni=6, seed=0):
    data = make_data(n_train, n_valid, bs, ni, seed=seed)
    return Learner(*get_model(data, lr=0.1, nh=5), F.cross_entropy, data)


class CountCallback(Callback):
    def begin_fit(self): self.n = 0
    def after_step(self): self.n += 1


# --- delegation, names, pickling ---

def test_pickle_and_deepcopy_callback_before_and_after_set_runner():
    cb = CountCallback()
    for f in (lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy):
        c2 = f(cb)
        assert type(c2) is CountCallback and c2.run is None
    run = Runner(cbs=cb)
    assert cb.run is run
    for f in (lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy):
        c2 = f(cb)
        assert isinstance(c2.run, Runner) and c2.run.count is c2


def test_pickle_and_deepcopy_runner_before_and_after_fit():
    run = Runner(cbs=[CountCallback, partial(AvgStatsCallback, accuracy, silent=True)])
    for r in (pickle.loads(pickle.dumps(run)), copy.deepcopy(run)): assert [type(c) for c in r.cbs] == [type(c) for c in run.cbs]
    run.fit(1, make_learn())
    for r in (pickle.loads(pickle.dumps(run)), copy.deepcopy(run)):
        assert r.count.n == run.count.n == 10 and r.count.run is r
        r.fit(1, make_learn())  # a copy still works
        assert r.count.n == 10


def test_getattr_without_runner_raises_attribute_error():
    cb = CountCallback()
    with pytest.raises(AttributeError, match="no attribute 'model'"): cb.model
    with pytest.raises(AttributeError): cb.__setstate__x
    run = Runner(cbs=cb)
    assert cb.in_train is False and cb.cbs is run.cbs
    with pytest.raises(AttributeError): cb._private


def test_names_and_callbacks_as_instances_classes_partials():
    class AlphaCallback(Callback): pass
    class BetaCallback(Callback):
        def __init__(self, k): self.k = k
    class Gamma(Callback): pass
    run = Runner(cbs=[AlphaCallback, Gamma()], cb_funcs=partial(BetaCallback, 3))
    assert isinstance(run.alpha, AlphaCallback) and run.beta.k == 3 and isinstance(run.gamma, Gamma)
    assert isinstance(run.train_eval, TrainEvalCallback) and run.train_eval.name == 'train_eval'
    assert AvgStatsCallback(accuracy).name == 'avg_stats'
    with pytest.raises(TypeError, match='not a Callback'): Runner(cbs=[3])
    class ModelCallback(Callback): pass
    with pytest.raises(ValueError, match='run.model'): Runner(cbs=ModelCallback)


def test_add_and_remove_cbs():
    run = Runner()
    cb = CountCallback()
    run.add_cbs(cb)
    assert run.count is cb and cb.run is run
    run.remove_cbs(cb)
    assert cb not in run.cbs and not hasattr(run, 'count')


# --- the loop ---

def test_event_sequence_tiny_fit():
    run = Runner(cbs=EventLogger)
    run.fit(1, make_learn(n_train=6, n_valid=3, bs=3))
    b = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']
    assert run.event_logger.events == ['begin_fit', 'begin_epoch', *b, *b, 'begin_validate',
                                       'begin_batch', 'after_pred', 'after_loss', 'after_batch', 'after_epoch', 'after_fit']


def test_callbacks_sorted_once_per_fit_not_per_event():
    reads = []
    class Ordered(Callback):
        @property
        def _order(self): reads.append(1); return 5
    def n_reads(n_train):
        reads.clear()
        run = Runner(cbs=[Ordered(), EventLogger])
        reads.clear()
        run.fit(2, make_learn(n_train=n_train))
        return len(reads), run
    (small, run), (big, _) = n_reads(8), n_reads(24)
    assert small == big <= 2
    assert [type(c).__name__ for c in run.cbs] == ['EventLogger', 'TrainEvalCallback', 'Ordered']


def test_call_returns_true_if_any_callback_truthy_and_runs_all():
    calls = []
    class A(Callback):
        def begin_validate(self): calls.append('a'); return 1
    class B(Callback):
        _order = 1
        def begin_validate(self): calls.append('b')
    run = Runner(cbs=[A, B, EventLogger])
    run.fit(1, make_learn())
    assert calls == ['a', 'b']  # both ran, and A's truthy answer skipped the validation batches
    assert run.event_logger.events.count('after_loss') == 10
    class C(Callback):
        def custom(self): return 0
    class D(Callback):
        def custom(self): return 'yes'
    assert Runner(cbs=[C, D])('custom') is True and Runner(cbs=C)('custom') is False and Runner()('no_such_event') is False


def test_cancel_train():
    class Stop(Callback):
        _order = 1
        def after_batch(self):
            if self.n_iter == 3: raise CancelTrainException()
    run = Runner(cbs=[Stop, EventLogger])
    run.fit(5, make_learn())
    ev = run.event_logger.events
    assert run.n_iter == 3 and ev.count('after_step') == 3 and ev[-2:] == ['after_cancel_train', 'after_fit']
    assert 'begin_validate' not in ev and 'after_epoch' not in ev


def test_cancel_epoch_each_pass():
    class Short(Callback):
        def after_batch(self):
            if self.iter == 1: raise CancelEpochException()
    run = Runner(cbs=[Short, EventLogger])
    run.fit(3, make_learn())
    ev = run.event_logger.events
    assert ev.count('after_step') == 2 * 3 and ev.count('after_cancel_epoch') == 2 * 3  # training and validation passes
    assert ev.count('after_epoch') == 3 and ev[-1] == 'after_fit'


def test_cancel_batch_skips_step_but_runs_after_batch():
    class Skip(Callback):
        def after_backward(self):
            if self.iter % 2: raise CancelBatchException()
    learn = make_learn()
    run = Runner(cbs=[Skip, EventLogger])
    run.fit(1, learn)
    ev = run.event_logger.events
    assert ev.count('after_step') == 5 and ev.count('after_cancel_batch') == 5 and run.n_iter == 10


def test_after_fit_runs_and_exception_propagates():
    log = []
    class Resource(Callback):
        def begin_fit(self): log.append('attach')
        def after_fit(self): log.append('release')
    class Boom(Callback):
        def after_loss(self):
            if self.n_iter == 2: raise RuntimeError('boom')
    run = Runner(cbs=[Resource, Boom])
    with pytest.raises(RuntimeError, match='boom'): run.fit(2, make_learn())
    assert log == ['attach', 'release'] and run.model is run.learn.model  # the learner is kept after the fit


def test_fit_rejects_bad_epochs():
    for e in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f'epochs={e}'): Runner().fit(e, make_learn())


# --- statistics ---

def test_avg_stats_weighted_by_samples_with_uneven_last_batch():
    learn = make_learn(n_train=10, n_valid=10, bs=3)  # valid batches of 6 and 4, train batches 3,3,3,1
    run = Runner(cbs=partial(AvgStatsCallback, [accuracy], silent=True))
    run.fit(1, learn)
    h = run.avg_stats.history[-1]
    x, y = learn.data.valid_ds.x, learn.data.valid_ds.y
    with torch.no_grad(): pred = learn.model.eval()(x)
    assert h['valid_loss'] == pytest.approx(F.cross_entropy(pred, y).item(), abs=1e-6)
    assert h['valid_accuracy'] == pytest.approx(accuracy(pred, y).item(), abs=1e-6)
    assert run.avg_stats.train_stats.count == 10 and run.avg_stats.valid_stats.count == 10


def test_avg_stats_prints_a_line_per_epoch(capsys):
    run = Runner(cbs=partial(AvgStatsCallback, accuracy))
    run.fit(2, make_learn())
    lines = capsys.readouterr().out.strip().split('\n')
    assert len(lines) == 2 and lines[1].startswith('epoch 1 | train: loss ') and '| valid: loss ' in lines[1]
    with pytest.raises(TypeError, match='not callable'): AvgStatsCallback(['accuracy'])


def test_train_eval_and_avg_stats_do_not_sync_per_batch(host_reads):
    from course_lib.cuda import DeviceCallback
    def syncs(n_train):
        learn = make_learn(n_train=n_train, n_valid=n_train, bs=4)
        reads = HostReads(host_reads.cs)
        Runner(cbs=[DeviceCallback(DEVICE), partial(AvgStatsCallback, accuracy, silent=True)] + reads.cbs).fit(2, learn)
        return reads.n, reads.in_batches
    a, b = syncs(40), syncs(120)
    assert a == b == (4, 0), (a, b)  # the stats are read once per epoch and per pass, never per batch


# --- failure paths of the loop (issue 12): nothing leaks out of a cancelled or interrupted batch, every after_fit runs

import numpy as np
from conftest import make_mlp, raised, Released, make_learn as learn_on

def _fixed_order_data(): return make_data(n_train=48, n_valid=16, bs=8, generator=torch.Generator().manual_seed(5))

def _weights(m): return [p.detach().clone() for p in m.parameters()]

def test_interrupted_batch_leaves_no_gradient_for_the_next_fit():
    "Ctrl-C after `backward`, before `step`: the next fit must not step with the interrupted batch's gradient."
    torch.manual_seed(0); m0 = make_mlp()
    m1, m2 = copy.deepcopy(m0), copy.deepcopy(m0)
    class CtrlC(Callback):
        def after_backward(self): raise KeyboardInterrupt()
    learn1 = Learner(m1, torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, _fixed_order_data())
    assert type(raised(lambda: Runner(cbs=CtrlC).fit(1, learn1))) is KeyboardInterrupt
    assert all(p.grad is None or not p.grad.any() for p in m1.parameters())
    learn1.data = _fixed_order_data()
    Runner().fit(1, learn1)
    Runner().fit(1, Learner(m2, torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, _fixed_order_data()))
    for a, b in zip(_weights(m1), _weights(m2)): assert torch.equal(a, b)

def test_batch_cancelled_after_backward_contributes_nothing():
    "A batch cancelled after its backward pass trains exactly like one cancelled before its forward pass."
    def run(event):
        class Skip(Callback): pass
        def cancel(self):
            if self.in_train and self.iter == 0: raise CancelBatchException()
        setattr(Skip, event, cancel)
        torch.manual_seed(0); m = make_mlp()
        Runner(cbs=Skip).fit(2, Learner(m, torch.optim.SGD(m.parameters(), lr=0.1), F.cross_entropy, _fixed_order_data()))
        return _weights(m)
    for a, b in zip(run('begin_batch'), run('after_backward')): assert torch.equal(a, b)

def test_every_after_fit_runs_and_the_first_error_names_the_others():
    class A(Callback):
        def after_fit(self): raise ValueError('a failed')
    class B(Callback):
        _order = 1
        def after_fit(self): raise RuntimeError('b failed')
    class Last(Released): _order = 2
    run = Runner(cbs=[A, B, Last])
    e = raised(lambda: run.fit(1, make_learn()))
    assert type(e) is ValueError and str(e) == 'a failed' and run.last.done
    notes = '\n'.join(e.__notes__)
    assert "callback A in event 'after_fit'" in notes and 'B' in notes and 'RuntimeError' in notes and 'b failed' in notes

def test_after_fit_errors_do_not_hide_the_error_that_ended_training():
    class Boom(Callback):
        def after_loss(self): raise KeyError('boom')
        def after_fit(self): raise ValueError('cleanup failed')
    run = Runner(cbs=[Boom, Released])
    e = raised(lambda: run.fit(1, make_learn()))
    assert type(e) is KeyError and run.released.done
    assert any('ValueError' in n and 'cleanup failed' in n for n in e.__notes__)

def test_fit_rejects_an_empty_validation_loader():
    data = make_data()
    empty = DataBunch(data.train_dl, torch.utils.data.DataLoader(Dataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), 8), 3)
    run = Runner(cbs=Released)
    with pytest.raises(ValueError, match=r'validation loader has no batches \(0 items'): run.fit(1, learn_on(empty))
    assert not hasattr(run.released, 'done')  # refused before any callback ran

@pytest.mark.parametrize('epochs', [np.int64(2), np.int32(2), np.uint8(2)])
def test_fit_accepts_any_integral_number_of_epochs(epochs):
    run = Runner(cbs=EventLogger)
    run.fit(epochs, make_learn())
    assert run.event_logger.events.count('after_epoch') == 2 and run.epochs == 2 and type(run.epochs) is int
