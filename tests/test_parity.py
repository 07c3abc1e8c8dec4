"""The Runner does the same maths as lesson 2's plain loop: from the same weights, seed and data order, a few
epochs through `Runner` with its default callbacks end with weights *equal* (bit for bit) to the plain loop's, for
an MLP, a CNN and with gradient accumulation. Any step the Runner adds, drops or reorders (a missing `zero_grad`,
a step in validation, a gradient left over) breaks the equality."""
import copy
from functools import partial
import torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.training import Dataset, get_dls, fit, accuracy
from course_lib.callbacks import *
from course_lib.cnn import get_cnn_model
from course_lib.accel import GradientAccumulation


def loaders(x, y, bs, seed=1):
    "Training loader shuffled by its own seeded generator (so both loops see the same order), validation in order."
    train_ds, valid_ds = Dataset(x[:96], y[:96]), Dataset(x[96:], y[96:])
    return get_dls(train_ds, valid_ds, bs, generator=torch.Generator().manual_seed(seed))[0], get_dls(train_ds, valid_ds, bs)[1]

def mlp_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 20, generator=g), torch.randint(0, 5, (128,), generator=g)

def cnn_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)

def mlp(): return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))

def runner_weights(model, opt_func, x, y, bs, epochs, cbs=()):
    train_dl, valid_dl = loaders(x, y, bs)
    learn = Learner(model, opt_func(model.parameters()), F.cross_entropy, DataBunch(train_dl, valid_dl, c=int(y.max()) + 1))
    Runner(cbs=[partial(AvgStatsCallback, accuracy, silent=True), *cbs]).fit(epochs, learn)
    return [p.detach().clone() for p in model.parameters()]

def plain_weights(model, opt_func, x, y, bs, epochs):
    fit(epochs, model, F.cross_entropy, opt_func(model.parameters()), *loaders(x, y, bs))
    return [p.detach().clone() for p in model.parameters()]

def assert_equal(ws1, ws2):
    assert len(ws1) == len(ws2)
    for a, b in zip(ws1, ws2): assert torch.equal(a, b), (a - b).abs().max()

def test_mlp_runner_equals_plain_loop():
    x, y = mlp_data()
    torch.manual_seed(0); m = mlp()
    sgd = partial(optim.SGD, lr=0.1, momentum=0.9)
    assert_equal(runner_weights(copy.deepcopy(m), sgd, x, y, 16, 3), plain_weights(copy.deepcopy(m), sgd, x, y, 16, 3))

def test_cnn_runner_equals_plain_loop():
    x, y = cnn_data()
    torch.manual_seed(0); m = get_cnn_model(DataBunch(None, None, c=10), [4, 8, 16])
    adam = partial(optim.Adam, lr=1e-3)
    assert_equal(runner_weights(copy.deepcopy(m), adam, x, y, 32, 2), plain_weights(copy.deepcopy(m), adam, x, y, 32, 2))

def plain_accum_weights(model, opt_func, x, y, bs, epochs, n):
    "Lesson 2's loop with gradient accumulation written inline: step every `n` batches and at the end of the pass."
    opt, (train_dl, _) = opt_func(model.parameters()), loaders(x, y, bs)
    for _ in range(epochs):
        model.train()
        for i, (xb, yb) in enumerate(train_dl):
            F.cross_entropy(model(xb), yb).backward()
            k = i % n + 1
            if k == n or i + 1 == len(train_dl):
                if k > 1:
                    for p in model.parameters(): p.grad.div_(k)
                opt.step(); opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]

def test_gradient_accumulation_runner_equals_plain_loop():
    x, y = mlp_data()
    torch.manual_seed(0); m = mlp()
    sgd = partial(optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    bs = 24  # 4 batches a pass: with n=3 the pass ends in the middle of a group, which steps on its own
    for n in (2, 3):
        assert_equal(runner_weights(copy.deepcopy(m), sgd, x, y, bs, 2, cbs=[partial(GradientAccumulation, n)]),
                     plain_accum_weights(copy.deepcopy(m), sgd, x, y, bs, 2, n))
