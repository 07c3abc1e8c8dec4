"""DistributedCallback on 2 CPU processes (gloo, loopback only). The tests start this file under `torchrun` twice: once
for a series of fits (`MODES`, each saving what the test needs), once for a fit that raises. As a script it is the
worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py OUT MODE`."""
import io, os, sys, time
from contextlib import redirect_stdout
from datetime import timedelta
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from course_lib.core import set_seed
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from course_lib.safety import TerminateOnNanCallback
from course_lib.checkpoint import Checkpoint
from course_lib.distributed import *

N, N_ODD, BS, EPOCHS = 256, 251, 32, 3

def make_data(bs, n=N):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N + 50, 10, generator=g) * 2 + 1, torch.randint(0, 4, (N + 50,), generator=g)
    return DataBunch(*get_dls(Dataset(x[:n], y[:n]), Dataset(x[N:], y[N:]), bs), c=4)

def make_model(bn=False, p=0.):
    torch.manual_seed(0)
    if bn: return nn.Sequential(nn.BatchNorm1d(10), nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 4))

def make_learn(model, data): return Learner(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, data)

def cpu_state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

# ---- the worker: one function per mode, each returns what its test checks

def own_group(name):
    "A process group the script makes itself (so the callback leaves it alone), on its own keys of torchrun's store."
    store, r, ws = next(dist.rendezvous('env://'))
    dist.init_process_group('gloo', store=dist.PrefixStore(f'test_{name}', store), rank=r, world_size=ws, timeout=timedelta(seconds=60))

class PgTimeout(Callback):
    def begin_epoch(self): self.timeout = dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout

def run_fit(out):
    learn = make_learn(make_model(), make_data(BS))
    run = Runner(cbs=[DistributedCallback, partial(AvgStatsCallback, accuracy), TerminateOnNanCallback, partial(Checkpoint, f'{out}/ck'), PgTimeout])
    buf = io.StringIO()
    with redirect_stdout(buf): run.fit(EPOCHS, learn)
    return {'model': learn.model.state_dict(), 'history': run.avg_stats.history, 'printed': buf.getvalue(), 'group_after_fit': dist.is_initialized(),
            'plain_after_fit': type(learn.model) is nn.Sequential and len(learn.data.train_dl) == N // BS, 'pg_timeout': run.pg_timeout.timeout.total_seconds()}

def run_uneven(out):
    own_group('uneven')
    try:
        learn = make_learn(make_model(), make_data(BS, N_ODD))
        run = Runner(cbs=[DistributedCallback, partial(AvgStatsCallback, accuracy, silent=True)])
        run.fit(EPOCHS, learn)
        return {'model': learn.model.state_dict(), 'history': run.avg_stats.history, 'n_iter': run.n_iter}
    finally: dist.destroy_process_group()

class BeforeSync(Callback):
    "Each rank's buffers at the end of training, before `DistributedCallback` (order -5) makes them agree."
    _order = -10
    def begin_validate(self): self.bufs = {k: b.detach().clone() for k, b in getattr(self.model, 'module', self.model).named_buffers()}

def run_bn(out):
    own_group('bn')
    try:
        res = {}
        for sync in (False, True):
            learn = make_learn(make_model(bn=True), make_data(BS))
            run = Runner(cbs=[partial(DistributedCallback, sync_bn=sync), partial(AvgStatsCallback, accuracy, silent=True), BeforeSync])
            run.fit(EPOCHS, learn)
            res[sync] = {'model': cpu_state(learn.model), 'before_sync': run.before_sync.bufs, 'history': run.avg_stats.history}
        return res
    finally: dist.destroy_process_group()

def run_rng(out):
    "4 epochs of a model with dropout, each rank with its own seed; again, stopped after 2 epochs and resumed."
    own_group('rng')
    class StopAfter(Callback):
        _order = 100
        def after_epoch(self):
            if self.epoch == 1: raise CancelTrainException()
    def fit(name, seed, *cbs, resume=False):
        learn = make_learn(make_model(p=0.5), make_data(BS))
        set_seed(seed)
        Runner(cbs=[DistributedCallback, partial(Checkpoint, f'{out}/{name}', monitor=None, resume=resume), *cbs]).fit(4, learn)
        return cpu_state(learn.model)
    try:
        r = dist.get_rank()
        whole = fit('whole', 100 + r)
        fit('stopped', 100 + r, StopAfter)
        return {'whole': whole, 'resumed': fit('stopped', 999, resume=True)}
    finally: dist.destroy_process_group()

def run_timeout(out):
    "Rank 1 stalls for 6 s in its third batch; rank 0 waits for it in the next gradient all-reduce."
    class Stall(Callback):
        def after_batch(self):
            if self.in_train and self.iter == 2:
                self.t = time.time()
                if dist.get_rank() == 1: time.sleep(6)
    learn = make_learn(make_model(), make_data(BS))
    run = Runner(cbs=[partial(DistributedCallback, timeout=2), Stall])
    try: run.fit(1, learn); return {'error': None}
    except RuntimeError as e: return {'error': str(e)[:500], 'waited': time.time() - run.stall.t}

class Boom(Callback):
    def after_batch(self):
        if self.epoch == 1 and self.iter == 2: raise RuntimeError('boom')

def run_boom(out):
    "Both ranks raise at the same batch; the group must be gone and the model plain afterwards."
    learn = make_learn(make_model(), make_data(BS))
    try: Runner(cbs=[DistributedCallback, Boom]).fit(2, learn); res = {'error': None}
    except RuntimeError as e: res = {'error': str(e)}
    return dict(res, group_after_error=dist.is_initialized(), unwrapped_after_error=type(learn.model) is nn.Sequential)

MODES = ('fit', 'uneven', 'bn', 'rng', 'timeout')

def worker(out, which):
    torch.set_num_threads(1)
    r = os.environ['RANK']
    for mode in (MODES if which == 'all' else [which]):
        try: res = globals()[f'run_{mode}'](out)
        except Exception as e: res = {'failed': f'{type(e).__name__}: {e}'[:3000]}
        torch.save(res, f'{out}/{mode}{r}.pth')

# ---- the tests

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    "The results of `MODES` on both ranks, from one `torchrun`: `ddp[mode]` is (rank 0's, rank 1's)."
    out = tmp_path_factory.mktemp('ddp')
    log = run_torchrun(__file__, out, 'all', nproc=2, timeout=240)
    def get(mode):
        rs = [torch.load(out/f'{mode}{r}.pth', weights_only=True) for r in range(2)]
        for r in rs: assert 'failed' not in r, r['failed']
        return rs
    return get, out, log

def one_process(data, n, model, epochs=EPOCHS, drop_last=False):
    "Train `model` on one process with batch size 2*BS in the order two ranks' `DistributedSampler`s give."
    one = DataBunch(DataLoader(data.train_ds, 2 * BS, sampler=PairedOrder(n, 2, BS, drop_last=drop_last)), data.valid_dl, c=4)
    run = Runner(cbs=partial(AvgStatsCallback, accuracy, silent=True))
    run.fit(epochs, make_learn(model, one))
    return run

class PairedOrder(torch.utils.data.Sampler):
    "One process's order equal to `ws` ranks' `DistributedSampler`s with batch size `bs` each, batch by batch."
    def __init__(self, n, ws, bs, seed=0, drop_last=False): self.n, self.ws, self.bs, self.seed, self.drop_last, self.epoch = n, ws, bs, seed, drop_last, 0
    def __len__(self): return self.n
    def __iter__(self):
        parts = []
        for r in range(self.ws):
            s = DistributedSampler(range(self.n), self.ws, r, shuffle=True, seed=self.seed, drop_last=self.drop_last); s.set_epoch(self.epoch)
            parts.append(list(s))
        self.epoch += 1
        for k in range(0, len(parts[0]), self.bs):
            for p in parts: yield from p[k:k + self.bs]

def test_without_torchrun_it_does_nothing(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'): monkeypatch.delenv(k, raising=False)
    model, data = make_model(), make_data(BS)
    learn = make_learn(model, data)
    seen = []
    class Look(Callback):
        def after_pred(self): seen.append(self.model)
    run = Runner(cbs=[DistributedCallback, Look, partial(AvgStatsCallback, accuracy, silent=True)])
    run.fit(1, learn)
    assert learn.model is model and learn.data is data and set(map(id, seen)) == {id(model)} and not dist.is_initialized()
    assert not torchrun_env()
    monkeypatch.setenv('RANK', '0'); monkeypatch.setenv('WORLD_SIZE', '1'); monkeypatch.setenv('LOCAL_RANK', '0')
    assert torchrun_env()

def test_sync_bn_swap_shares_parameters_and_buffers():
    from course_lib.distributed import _to_sync_bn
    model = make_model(bn=True)
    bns, x = [model[0], model[2]], torch.randn(8, 10)
    ref = model.eval()(x)
    swaps = _to_sync_bn(model)
    assert [type(model[i]) for i in (0, 2)] == [nn.SyncBatchNorm] * 2 and [c for _, _, c in swaps] == bns
    assert model[0].weight is bns[0].weight and model[2].running_var is bns[1].running_var
    assert torch.equal(model(x), ref)  # no process group: SyncBatchNorm is plain BatchNorm
    with pytest.raises(ValueError, match='timeout=-1'): DistributedCallback(timeout=-1)

def test_two_processes_bs32_equal_one_process_bs64(ddp):
    get, out, _ = ddp
    r0, r1 = get('fit')
    model = make_model()
    run = one_process(make_data(BS), N, model)
    for k, v in model.state_dict().items():
        assert (v - r0['model'][k]).abs().max() < 1e-5, k
        assert torch.equal(r0['model'][k], r1['model'][k]), k
    assert r0['history'] == r1['history'] and len(r0['history']) == EPOCHS
    for h1, h0 in zip(run.avg_stats.history, r0['history']): assert list(h1.values()) == pytest.approx(list(h0.values()), abs=1e-5)
    # output and checkpoints on rank 0 only; everything undone after the fit
    assert r0['printed'].count('epoch ') == EPOCHS and r1['printed'] == ''
    assert sorted(p.name for p in (out/'ck').iterdir()) == ['best.pth', 'epoch_000.pth', 'epoch_001.pth', 'epoch_002.pth']
    for r in (r0, r1): assert r['plain_after_fit'] and r['group_after_fit'] is False

def test_uneven_dataset_equals_one_process_without_the_padding(ddp):
    r0, r1 = ddp[0]('uneven')
    model = make_model()
    run = one_process(make_data(BS, N_ODD), N_ODD, model, drop_last=True)  # each epoch leaves out N_ODD % 2 items, repeats none
    for k, v in model.state_dict().items():
        assert (v - r0['model'][k]).abs().max() < 1e-5, k
        assert torch.equal(r0['model'][k], r1['model'][k]), k
    assert r0['n_iter'] == EPOCHS * 4 == run.n_iter  # 125 items per rank: batches of 32, 32, 32, 29
    for h1, h0 in zip(run.avg_stats.history, r0['history']): assert list(h1.values()) == pytest.approx(list(h0.values()), abs=1e-5)

def test_batchnorm_buffers_agree_across_ranks(ddp):
    r0, r1 = ddp[0]('bn')
    for sync in (False, True):
        a, b = r0[sync]['model'], r1[sync]['model']
        for k in a: assert torch.equal(a[k], b[k]), (sync, k)           # same weights and running statistics everywhere
        assert r0[sync]['history'] == r1[sync]['history']
        for k in ('0.running_mean', '0.running_var', '2.running_mean', '2.running_var'):
            want = r0[False]['before_sync'][k] if not sync else (r0[True]['before_sync'][k] + r1[True]['before_sync'][k]) / 2
            assert torch.allclose(a[k], want, atol=1e-6), (sync, k)     # rank 0's, or the average with sync_bn
    # with sync_bn the input layer's running mean is the one a single process with batch size 64 computes;
    # the weights are not: each rank normalises by the statistics of its own 32 items (SyncBatchNorm is CUDA-only)
    model = make_model(bn=True)
    one_process(make_data(BS), N, model)
    assert torch.allclose(model.state_dict()['0.running_mean'], r0[True]['model']['0.running_mean'], atol=1e-5)
    assert (model.state_dict()['1.weight'] - r0[True]['model']['1.weight']).abs().max() > 1e-3

def test_resume_restores_each_ranks_generators(ddp):
    for r in ddp[0]('rng'):
        for k, v in r['whole'].items(): assert (v - r['resumed'][k]).abs().max() <= 1e-6, k

def test_stalled_rank_fails_after_the_timeout(ddp):
    r0, r1 = ddp[0]('timeout')
    assert r0['error'] and 2 <= r0['waited'] < 5.5, r0    # not the 6 s rank 1 stalled, nor the 30 min of PyTorch's default
    assert r1['error']                                   # rank 1 then finds rank 0 gone
    assert ddp[0]('fit')[0]['pg_timeout'] == 120                   # the default on CPU (gloo): 2 minutes

def test_exception_in_fit_still_destroys_group_and_unwraps(tmp_path):
    run_torchrun(__file__, tmp_path, 'boom', nproc=2, timeout=120)
    r0, r1 = (torch.load(tmp_path/f'boom{r}.pth', weights_only=True) for r in range(2))
    # a rank that tears its group down first can cut the other's last all-reduce short: that one fails with a gloo
    # connection error instead of 'boom' (under torchrun the agent stops all workers when one fails anyway)
    assert 'boom' in (r0['error'], r1['error'])
    for r in (r0, r1): assert r['error'] and r['group_after_error'] is False and r['unwrapped_after_error']

if __name__ == '__main__': worker(*sys.argv[1:])
