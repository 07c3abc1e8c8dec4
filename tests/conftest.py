"Fixtures and helpers shared by the test files."
import os, pytest, torch
from pathlib import Path
from torch import nn, optim
import torch.nn.functional as F
from course_lib.training import Dataset, get_dls
from course_lib.callbacks import Callback, DataBunch, Learner

@pytest.fixture
def data_env(tmp_path, monkeypatch):
    "A private data dir and an empty mirror dir; downloads allowed unless a test turns them off."
    d, m = tmp_path/'data', tmp_path/'mirror'
    d.mkdir(); m.mkdir()
    monkeypatch.setenv('COURSE_DATA', str(d))
    monkeypatch.setenv('COURSE_DATA_MIRROR', str(m))
    monkeypatch.setenv('COURSE_OFFLINE', '0')
    return d, m

def pytest_pycollect_makeitem(collector, name, obj):
    "Collect only test functions defined in the test file, not helpers like `test_eq` brought in by `import *`."
    if callable(obj) and name.startswith('test') and getattr(obj, '__module__', None) != collector.obj.__name__: return []

def make_data(n_train=64, n_valid=32, bs=8, ni=6, nc=3, seed=0, **kwargs):
    "A `DataBunch` of random N(0,1) inputs of size `ni` and labels in `range(nc)`; `kwargs` go to `get_dls`."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, ni, generator=g), torch.randint(0, nc, (n_train + n_valid,), generator=g)
    return DataBunch(*get_dls(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), bs, **kwargs), c=nc)

def make_mlp(ni=6, nh=16, nc=3, p=0.):
    return nn.Sequential(nn.Linear(ni, nh), nn.ReLU(), nn.Dropout(p), nn.Linear(nh, nc))

def make_learn(data=None, model=None, p=0.2, lr=0.1, momentum=0.9, ni=6):
    "An MLP (dropout `p`) and SGD on `data` (default: `make_data()`)."
    data = data or make_data(ni=ni)
    model = model or make_mlp(ni, nc=data.c, p=p)
    return Learner(model, optim.SGD(model.parameters(), lr=lr, momentum=momentum), F.cross_entropy, data)

def raised(f):
    "The exception `f()` raises (any `BaseException`); fails if it raises none."
    try: f()
    except BaseException as e: return e
    raise AssertionError('did not raise')

def max_diff(m1, m2):
    "Largest absolute difference between the parameters of two models."
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))

class Released(Callback):
    "Records in `done` whether `after_fit` ran."
    def begin_fit(self): self.done = False
    def after_fit(self): self.done = True

class Steps(Callback):
    "Counts optimizer steps in `n`."
    def begin_fit(self): self.n = 0
    def after_step(self): self.n += 1

STANDIN = Path(__file__).resolve().parent.parent/'tools'/'standin'

class HostReads:
    "Host reads of device tensors (GPU syncs) under the CUDA stand-in: `n` in all, `in_batches` from a batch's first event to its last."
    def __init__(self, cs):
        self.cs,self.start,self.in_batches = cs,cs.syncs(),0
        reads = self
        class On(Callback):
            _order = -100
            def begin_batch(self): reads.at = cs.syncs()
        class Off(Callback):
            _order = 100
            def after_batch(self): reads.in_batches += cs.syncs() - reads.at
        self.cbs = [On(), Off()]
    @property
    def n(self): return self.cs.syncs() - self.start

@pytest.fixture
def host_reads():
    "The CUDA stand-in on (fit on `DEVICE`) and a `HostReads`, whose `cbs` a fit adds: what a GPU would wait for."
    import sys
    sys.path.insert(0, str(STANDIN))
    import cuda_standin as cs
    with cs.standin(): yield HostReads(cs)

DEVICE = 'cuda'  # under the stand-in

# --- lesson 5's conv net on random 28x28 "images"
N, BS = 96, 16  # 6 training batches of 16, 2 validation batches of 32

def image_data(n=N, bs=BS):
    "Random flat 784-pixel images and 10 classes: `n` training items, `n//2` validation items."
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataBunch(*get_dls(Dataset(x, y), Dataset(x[:n//2], y[:n//2]), bs), 10)

def image_learn(data=None, model=None, lr=0.1):
    "Lesson 5a's conv net (channels 4, 8) and plain SGD on `image_data()`."
    from course_lib.cnn import get_cnn_model
    data = data or image_data()
    model = model or get_cnn_model(data, [4, 8])
    return Learner(model, optim.SGD(model.parameters(), lr=lr), F.cross_entropy, data)

def view():
    "The batch transform that reshapes flat images to 1x28x28."
    from course_lib.cuda import BatchTransformXCallback, view_tfm
    return BatchTransformXCallback(view_tfm(1, 28, 28))

def n_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())
