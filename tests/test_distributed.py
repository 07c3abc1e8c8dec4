"""DistributedCallback. The two-process test runs this file under `torchrun` (gloo on CPU, loopback only); as a
script it is the worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py OUT`."""
import io, os, sys
from contextlib import redirect_stdout
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from course_lib.training import accuracy, Dataset, get_dls
from course_lib.callbacks import *
from course_lib.safety import TerminateOnNanCallback
from course_lib.checkpoint import Checkpoint
from course_lib.distributed import *

N, BS, EPOCHS = 256, 32, 3

def make_data(bs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N + 50, 10, generator=g), torch.randint(0, 4, (N + 50,), generator=g)
    return DataBunch(*get_dls(Dataset(x[:N], y[:N]), Dataset(x[N:], y[N:]), bs), c=4)

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))

def make_learn(model, data): return Learner(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, data)

class Boom(Callback):
    def after_batch(self):
        if self.epoch == 1 and self.iter == 2: raise RuntimeError('boom')


def worker(out, mode):
    torch.set_num_threads(1)
    r = os.environ['RANK']
    learn = make_learn(make_model(), make_data(BS))
    if mode == 'boom':  # both ranks raise at the same batch; the group must be gone and the model plain afterwards
        try: Runner(cbs=[DistributedCallback, Boom]).fit(2, learn)
        except RuntimeError as e: res = {'error': str(e)}
        res.update(group_after_error=dist.is_initialized(), unwrapped_after_error=type(learn.model) is nn.Sequential)
        return torch.save(res, f'{out}/boom{r}.pth')
    run = Runner(cbs=[DistributedCallback, partial(AvgStatsCallback, accuracy), TerminateOnNanCallback, partial(Checkpoint, f'{out}/ck')])
    buf = io.StringIO()
    with redirect_stdout(buf): run.fit(EPOCHS, learn)
    torch.save({'model': learn.model.state_dict(), 'history': run.avg_stats.history, 'printed': buf.getvalue(), 'group_after_fit': dist.is_initialized(),
                'plain_after_fit': type(learn.model) is nn.Sequential and len(learn.data.train_dl) == N // BS}, f'{out}/rank{r}.pth')


class PairedOrder(torch.utils.data.Sampler):
    "One process's order equal to `ws` ranks' `DistributedSampler`s with batch size `bs` each, batch by batch."
    def __init__(self, n, ws, bs, seed=0): self.n, self.ws, self.bs, self.seed, self.epoch = n, ws, bs, seed, 0
    def __len__(self): return self.n
    def __iter__(self):
        parts = []
        for r in range(self.ws):
            s = DistributedSampler(range(self.n), self.ws, r, shuffle=True, seed=self.seed); s.set_epoch(self.epoch)
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


def test_two_processes_bs32_equal_one_process_bs64(tmp_path):
    run_torchrun(__file__, tmp_path, 'fit', nproc=2, timeout=120)
    r0, r1 = (torch.load(tmp_path/f'rank{r}.pth', weights_only=True) for r in range(2))
    # one process, batch size 64, the same data order
    model = make_model()
    data = make_data(BS)
    one = DataBunch(DataLoader(data.train_ds, 2 * BS, sampler=PairedOrder(N, 2, BS)), data.valid_dl, c=4)
    run = Runner(cbs=partial(AvgStatsCallback, accuracy, silent=True))
    run.fit(EPOCHS, make_learn(model, one))
    for k, v in model.state_dict().items():
        assert (v - r0['model'][k]).abs().max() < 1e-5, k
        assert torch.equal(r0['model'][k], r1['model'][k]), k
    assert r0['history'] == r1['history'] and len(r0['history']) == EPOCHS
    for h1, h0 in zip(run.avg_stats.history, r0['history']): assert list(h1.values()) == pytest.approx(list(h0.values()), abs=1e-5)
    # output and checkpoints on rank 0 only; everything undone after the fit, also after an exception
    assert r0['printed'].count('epoch ') == EPOCHS and r1['printed'] == ''
    assert sorted(p.name for p in (tmp_path/'ck').iterdir()) == ['best.pth', 'epoch_000.pth', 'epoch_001.pth', 'epoch_002.pth']
    for r in (r0, r1): assert r['plain_after_fit'] and r['group_after_fit'] is False


def test_exception_in_fit_still_destroys_group_and_unwraps(tmp_path):
    run_torchrun(__file__, tmp_path, 'boom', nproc=2, timeout=120)
    r0, r1 = (torch.load(tmp_path/f'boom{r}.pth', weights_only=True) for r in range(2))
    # a rank that tears its group down first can cut the other's last all-reduce short: that one fails with a gloo
    # connection error instead of 'boom' (under torchrun the agent stops all workers when one fails anyway)
    assert 'boom' in (r0['error'], r1['error'])
    for r in (r0, r1): assert r['error'] and r['group_after_error'] is False and r['unwrapped_after_error']

if __name__ == '__main__': worker(*sys.argv[1:])
