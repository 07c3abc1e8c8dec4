"""Checkpoints when things go wrong (issue 12): two writers of one file, a flipped byte, a checkpoint of another
optimizer or with bad callback state, a full disk."""
import copy, errno, io, os, random, threading
from functools import partial
import numpy as np, pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.training import accuracy
from course_lib.callbacks import *
from course_lib.anneal import Recorder
from course_lib.checkpoint import *
from conftest import make_learn, raised

def fitted(seed=0, epochs=1, cbs=(), **kw):
    "A runner and learner after `epochs` epochs of the conftest MLP."
    torch.manual_seed(seed)
    learn, run = make_learn(**kw), Runner(cbs=[Recorder, partial(AvgStatsCallback, accuracy, silent=True), *cbs])
    run.fit(epochs, learn)
    return run, learn

def snapshot(learn):
    "Everything of the learner and the global generators that loading a checkpoint may change."
    return (copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict()), type(learn.opt),
            torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

def same(a, b):
    "Equal nested structures of tensors, numbers, strings, lists, tuples and dicts."
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray): return np.array_equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) == type(b) and a == b

def hidden(d): return sorted(p.name for p in d.iterdir() if p.name.startswith('.'))

# ---- two writers of one path

def test_two_writers_of_one_path_last_complete_write_wins(tmp_path, monkeypatch):
    fn = tmp_path/'ck.pth'
    (ra, la), (rb, lb) = fitted(1), fitted(2)
    real_save, half, b_done = torch.save, threading.Event(), threading.Event()
    def slow_save(obj, f, *args, **kwargs):  # writer a stops half-way through its bytes until writer b has finished
        if threading.current_thread().name != 'a': return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO(); real_save(obj, buf, *args, **kwargs); raw = buf.getvalue()
        f.write(raw[:len(raw) // 2]); half.set(); b_done.wait(20); f.write(raw[len(raw) // 2:])
    monkeypatch.setattr(torch, 'save', slow_save)
    errors = {}
    def write(name, run):
        try: save_checkpoint(run, fn)
        except BaseException as e: errors[name] = e
    ta = threading.Thread(target=write, args=('a', ra), name='a'); ta.start()
    assert half.wait(20)
    write('b', rb)                                # b writes all of its file while a is half-way through
    seen = read_checkpoint(fn)                    # a reader in between sees b's complete file
    b_done.set(); ta.join(20)
    assert errors == {}
    assert same(seen['model'], lb.model.state_dict()) and same(read_checkpoint(fn)['model'], la.model.state_dict())  # a finished last
    assert hidden(tmp_path) == []

class Racing(Checkpoint):
    "A `Checkpoint` sharing its folder with another run, which removes the old epoch files just after we list them."
    def epoch_files(self):
        fs = super().epoch_files()
        for f in fs[:-self.keep]: f.unlink()
        return fs

def test_two_runs_in_one_folder_both_prune_old_epochs(tmp_path):
    run = Runner(cbs=[Racing(tmp_path, keep=1, monitor=None)])
    run.fit(3, make_learn())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_002.pth']

# ---- a flipped byte

def test_flipped_byte_in_tensor_data_is_detected(tmp_path):
    run, learn = fitted()
    fn = save_checkpoint(run, tmp_path/'ck.pth')
    raw, w = fn.read_bytes(), learn.model[0].weight.detach().numpy().tobytes()
    i = raw.find(w); assert i > 0
    bad = bytearray(raw); bad[i + len(w) // 2] ^= 0x10
    (tmp_path/'bad.pth').write_bytes(bytes(bad))
    other = make_learn()
    w0 = copy.deepcopy(other.model.state_dict())
    with pytest.raises(CheckpointError, match='bad.pth'): read_checkpoint(tmp_path/'bad.pth')
    with pytest.raises(CheckpointError, match='bad.pth'): load_weights(other.model, tmp_path/'bad.pth')
    assert same(other.model.state_dict(), w0)

def test_no_flipped_byte_loads_as_different_content(tmp_path):
    run, _ = fitted()
    fn = save_checkpoint(run, tmp_path/'ck.pth')
    raw, good = fn.read_bytes(), read_checkpoint(fn)
    for pos in range(0, len(raw), max(1, len(raw) // 60)):
        bad = bytearray(raw); bad[pos] ^= 0x01
        (tmp_path/'bad.pth').write_bytes(bytes(bad))
        try: sd = read_checkpoint(tmp_path/'bad.pth')
        except CheckpointError: continue
        assert same(sd, good), f'byte {pos} of {len(raw)} flipped: loaded without an error, with different content'

# ---- validated before anything is applied

class Fussy(Callback):
    "A callback whose saved state is malformed: loading it raises."
    def state_dict(self): return {'count': 1}
    def load_state_dict(self, sd, device=None): self.n = sd['n']

@pytest.mark.parametrize('case', ['sgd_into_adam', 'group_keys', 'callback_state'])
def test_bad_checkpoint_changes_nothing(tmp_path, case):
    src, _ = fitted(1, cbs=[Fussy] if case == 'callback_state' else [])
    if case == 'group_keys': src.opt.param_groups[0]['warmup'] = 5
    fn = save_checkpoint(src, tmp_path/'ck.pth')
    torch.manual_seed(2)
    learn = make_learn()
    if case == 'sgd_into_adam': learn.opt = optim.Adam(learn.model.parameters(), lr=1e-3)
    Runner().fit(1, learn)                               # some optimizer state to protect
    before = snapshot(learn)
    run = Runner(cbs=[Recorder, partial(AvgStatsCallback, accuracy, silent=True), Fussy, partial(Checkpoint, tmp_path/'new', monitor=None, resume=fn)])
    e = raised(lambda: run.fit(2, learn))
    assert isinstance(e, CheckpointError) and 'ck.pth' in str(e), repr(e)
    assert {'sgd_into_adam': 'SGD', 'group_keys': 'warmup', 'callback_state': 'fussy'}[case] in str(e)
    assert same(snapshot(learn), before)
    assert run.recorder.state_dict()['losses'].numel() == 0 and run.avg_stats.history == [] and not hasattr(run.fussy, 'n')
    assert run.start_epoch == 0 and run.n_iter == 0

# ---- a full disk

def full_disk_save(after):
    "`torch.save` into a file whose disk fills up after `after` bytes (the write raises ENOSPC, as the OS does)."
    real = torch.save
    def save(obj, f, *args, **kwargs):
        class Full:
            n = 0
            def write(self, b):
                self.n += len(b)
                if self.n > after: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(b)
            def flush(self): f.flush()
        return real(obj, Full(), *args, **kwargs)
    return save

@pytest.mark.parametrize('where', ['write', 'fsync'])
def test_disk_full_while_writing(tmp_path, monkeypatch, where):
    run, learn = fitted()
    fn = save_checkpoint(run, tmp_path/'ck.pth')
    old = fn.read_bytes()
    Runner().fit(1, learn)
    if where == 'write': monkeypatch.setattr(torch, 'save', full_disk_save(1000))
    else:
        def fsync(fd): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(CheckpointError) as e: save_checkpoint(run, fn)
    msg = str(e.value)
    assert str(fn) in msg and 'disk is full' in msg and 'intact' in msg
    monkeypatch.undo()
    assert fn.read_bytes() == old and hidden(tmp_path) == []
    monkeypatch.setattr(torch, 'save', full_disk_save(10))   # with no old file, nothing is left either
    with pytest.raises(CheckpointError, match='disk is full'): save_checkpoint(run, tmp_path/'new.pth')
    monkeypatch.undo()
    assert not (tmp_path/'new.pth').exists() and hidden(tmp_path) == []


# ---- resuming (issue 22): from the cycle files of an SGDR run, and never past the fit's end

def test_resume_true_continues_from_the_last_cycle_file(tmp_path):
    from course_lib.anneal import SGDRCallback, sgdr_cycles
    def sgdr(path, n_cycles, resume=False, seed=0):
        torch.manual_seed(seed)
        learn = make_learn()
        run = Runner(cbs=[Recorder, partial(AvgStatsCallback, accuracy, silent=True), SGDRCallback(0.1, 0., n_cycles, cycle_mult=2),
                          Checkpoint(path, every_epoch=False, monitor=None, resume=resume)])
        run.fit(sum(sgdr_cycles(n_cycles, cycle_mult=2)), learn)
        return run, learn
    full, lf = sgdr(tmp_path/'a', 3)
    sgdr(tmp_path/'b', 2)                                             # the same run stopped after two cycles
    resumed, lr_ = sgdr(tmp_path/'b', 3, resume=True, seed=1)          # another init: the checkpoint must replace it
    assert resumed.start_epoch == 3 and sorted(p.name for p in (tmp_path/'b').iterdir()) == ['cycle_0.pth', 'cycle_1.pth', 'cycle_2.pth']
    for p, q in zip(lf.model.parameters(), lr_.model.parameters()): assert torch.equal(p, q)

def test_a_checkpoint_past_the_fits_end_is_refused_before_anything_changes(tmp_path):
    run, learn = fitted(epochs=3, cbs=[partial(Checkpoint, tmp_path, monitor=None)])
    run2, other = fitted(seed=1)
    before = snapshot(other)
    e = raised(lambda: Runner(cbs=[Checkpoint(tmp_path, monitor=None, resume=True)]).fit(2, other))
    assert isinstance(e, CheckpointError) and 'saved after epoch 3, but this fit lasts 2 epochs' in str(e) and 'epoch_002.pth' in str(e)
    assert all(same(a, b) for a, b in zip(snapshot(other), before))
    run3 = Runner(cbs=[Checkpoint(tmp_path, monitor=None, resume=True), Steps := type('Steps', (Callback,), {'begin_fit': lambda s: setattr(s, 'n', 0), 'after_step': lambda s: setattr(s, 'n', s.n + 1)})()])
    run3.fit(3, other)                                                 # a finished run rerun: nothing left, nothing refused
    assert run3.start_epoch == 3 and run3.steps.n == 0
