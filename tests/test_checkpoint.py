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
from course_lib.checkpoint import *
from course_lib.files import state_digest


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
    assert len(sd['rng']) == 1 and set(sd['rng'][0]) >= {'torch', 'numpy', 'python'} and len(sd['generators']) == 1
    assert sd['opt_class'] == 'SGD' and sd['digest'] == state_digest({k: v for k, v in sd.items() if k != 'digest'})
    assert set(sd['cbs']) == {'recorder', 'avg_stats', 'checkpoint'} and sd['cbs']['recorder']['losses'].shape == (16,)
    assert len(sd['cbs']['avg_stats']['history']) == 2 and sd['opt']['state']  # momentum buffers

def test_keep_best_and_cycle_checkpoints(tmp_path):
    class Acc(Callback):  # a fake validation metric per epoch, to know the best epoch in advance
        _order = 1
        def after_epoch(self): self.run.avg_stats.history[-1]['valid_accuracy'] = [0.5, 0.9, 0.7, 0.8, 0.6, 0.85, 0.1][self.epoch]
    run = Runner(cbs=[partial(AvgStatsCallback, accuracy, silent=True), Acc, SGDRCallback(0.1, n_cycles=3, cycle_mult=2),
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

def resave(sd, fn):
    "Save an edited checkpoint with the digest of its new content, so that loading reaches the checks after the digest's."
    sd['digest'] = state_digest({k: v for k, v in sd.items() if k != 'digest'})
    torch.save(sd, fn)

def test_corrupt_truncated_or_mismatched_checkpoint_leaves_model_untouched(tmp_path):
    Runner(cbs=ck_cbs(tmp_path/'ok')).fit(1, make_learn())
    good = tmp_path/'ok'/'epoch_000.pth'
    raw = good.read_bytes()
    (tmp_path/'trunc.pth').write_bytes(raw[:len(raw) // 3])
    (tmp_path/'junk.pth').write_bytes(b'\x00' * 500)
    torch.save({'model': {}}, tmp_path/'partial.pth')
    sd = torch.load(good, weights_only=True)
    sd['opt']['param_groups'][0]['params'] = sd['opt']['param_groups'][0]['params'][:-1]
    resave(sd, tmp_path/'opt_mismatch.pth')
    sd = torch.load(good, weights_only=True)
    sd['rng'][0]['torch'] = sd['rng'][0]['torch'][:10]
    resave(sd, tmp_path/'bad_rng.pth')
    sd = torch.load(good, weights_only=True)
    sd['opt']['state'][0]['momentum_buffer'] = torch.zeros(2, 2)
    resave(sd, tmp_path/'bad_state.pth')
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
