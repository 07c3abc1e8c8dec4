"Edge cases of course_lib.training: empty data, odd batch sizes, samplers, collate errors, fit's averaging, stability."
import pytest, torch
from torch import nn, tensor
import torch.nn.functional as F
from course_lib.training import *
from course_lib.training import DataLoader  # PyTorch's, not hidden by our names


def ds_of(n, nf=3):
    return Dataset(torch.arange(n*nf, dtype=torch.float32).reshape(n, nf), torch.arange(n) % 2)


# --- Sampler ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('shuffle', [False, True])
@pytest.mark.parametrize('n,bs', [(10, 1), (10, 3), (10, 4), (10, 5), (10, 10), (10, 11), (7, 64), (1, 1)])
def test_sampler_covers_every_index_once(n, bs, shuffle):
    s = Sampler(ds_of(n), bs, shuffle=shuffle)
    for _ in range(3):  # every epoch
        batches = list(s)
        assert len(batches) == len(s) == -(-n // bs)
        assert all(len(b) == bs for b in batches[:-1]) and 1 <= len(batches[-1]) <= bs
        assert sorted(torch.cat(batches).tolist()) == list(range(n))
    if not shuffle: assert torch.cat(batches).tolist() == list(range(n))


def test_sampler_shuffles_each_epoch():
    s = Sampler(ds_of(1000), 100, shuffle=True)
    e1, e2 = torch.cat(list(s)), torch.cat(list(s))
    assert not torch.equal(e1, e2) and not torch.equal(e1, torch.arange(1000))


def test_sampler_sees_dataset_length_at_iteration():
    x = [1, 2, 3]
    s = Sampler(x, 2)
    x.append(4)
    assert [b.tolist() for b in s] == [[0, 1], [2, 3]]


@pytest.mark.parametrize('bs', [0, -1, 2.5, '4', None, True])
def test_bad_bs(bs):
    with pytest.raises(ValueError, match=rf'bs={bs!r}, expected an integer >= 1'): Sampler(ds_of(5), bs)
    with pytest.raises(ValueError, match=rf'bs={bs!r}, expected an integer >= 1'): get_dls(ds_of(5), ds_of(5), bs)


# --- empty datasets and big batch sizes ------------------------------------------------------------

def test_empty_dataset_yields_no_batches():
    ds = ds_of(0)
    assert len(ds) == 0
    for shuffle in (False, True):
        dl = BasicDataLoader(ds, Sampler(ds, 4, shuffle=shuffle))
        assert len(dl) == 0 and list(dl) == []


def test_bs_larger_than_dataset_gives_one_partial_batch():
    ds = ds_of(5)
    for shuffle in (False, True):
        batches = list(BasicDataLoader(ds, Sampler(ds, 64, shuffle=shuffle)))
        assert len(batches) == 1
        xb, yb = batches[0]
        assert xb.shape == (5, 3) and yb.shape == (5,)
        assert sorted(xb[:, 0].tolist()) == [0., 3., 6., 9., 12.]
    tdl, vdl = get_dls(ds, ds, 64)
    assert [len(yb) for _, yb in tdl] == [5] and [len(yb) for _, yb in vdl] == [5]


def test_dataset_length_mismatch():
    with pytest.raises(ValueError, match='x has 3 items but y has 2'): Dataset(torch.zeros(3, 2), torch.zeros(2))


# --- collate --------------------------------------------------------------------------------------

def test_collate_stacks():
    xb, yb = collate([(torch.ones(2), tensor(0)), (torch.zeros(2), tensor(1))])
    assert torch.equal(xb, tensor([[1., 1.], [0., 0.]])) and torch.equal(yb, tensor([0, 1]))


def test_collate_mismatched_shapes_names_them():
    with pytest.raises(ValueError, match=r'inputs.*\(3,\), \(4,\)'):
        collate([(torch.zeros(3), tensor(0)), (torch.zeros(4), tensor(1))])
    with pytest.raises(ValueError, match=r'targets.*\(\), \(2,\)'):
        collate([(torch.zeros(3), tensor(0)), (torch.zeros(3), tensor([1, 2]))])


def test_collate_non_tensor_and_empty():
    with pytest.raises(ValueError, match=r'targets.*int'): collate([(torch.zeros(3), 0), (torch.zeros(3), 1)])
    with pytest.raises(ValueError, match='empty batch'): collate([])


# --- get_dls --------------------------------------------------------------------------------------

def test_get_dls_sizes_and_order():
    ds = ds_of(25)
    tdl, vdl = get_dls(ds, ds, 4)
    assert isinstance(tdl, DataLoader) and (tdl.batch_size, vdl.batch_size) == (4, 8)
    assert [len(yb) for _, yb in vdl] == [8, 8, 8, 1]
    assert torch.cat([xb for xb, _ in vdl]).equal(ds.x)
    assert sorted(torch.cat([xb[:, 0] for xb, _ in tdl]).tolist()) == ds.x[:, 0].tolist()


# --- fit ------------------------------------------------------------------------------------------

def _problem(n=103, nf=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, nf, generator=g), torch.randint(0, c, (n,), generator=g)
    return Dataset(x, y), nn.Sequential(nn.Linear(nf, 8), nn.ReLU(), nn.Linear(8, c))


@pytest.mark.parametrize('vbs', [1, 10, 50, 102, 103, 500])
def test_fit_averages_uneven_batches_by_items(vbs):
    ds, model = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_dl = BasicDataLoader(ds, Sampler(ds, 16, shuffle=True))
    valid_dl = BasicDataLoader(ds, Sampler(ds, vbs))
    loss, acc = fit(2, model, F.cross_entropy, opt, train_dl, valid_dl)
    assert isinstance(loss, float) and isinstance(acc, float)
    model.eval()
    with torch.no_grad(): pred = model(ds.x)
    assert loss == pytest.approx(F.cross_entropy(pred, ds.y).item(), abs=1e-5)
    assert acc == pytest.approx(accuracy(pred, ds.y).item(), abs=1e-6)


def test_fit_sets_train_and_eval_modes():
    seen = []
    class Spy(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return x
    ds, model = _problem(n=10)
    model = nn.Sequential(model, Spy())
    fit(1, model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
        BasicDataLoader(ds, Sampler(ds, 5)), BasicDataLoader(ds, Sampler(ds, 10)))
    assert seen == [(True, True), (True, True), (False, False)]


def test_fit_empty_loaders_raise():
    ds, model = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = ds_of(0)
    dl = BasicDataLoader(ds, Sampler(ds, 16))
    with pytest.raises(ValueError, match='train_dl yielded no batches'):
        fit(1, model, F.cross_entropy, opt, BasicDataLoader(empty, Sampler(empty, 4)), dl)
    with pytest.raises(ValueError, match='valid_dl yielded no batches'):
        fit(1, model, F.cross_entropy, opt, dl, BasicDataLoader(empty, Sampler(empty, 4)))


@pytest.mark.parametrize('epochs', [0, -1, 1.5, True])
def test_fit_bad_epochs(epochs):
    ds, model = _problem()
    dl = BasicDataLoader(ds, Sampler(ds, 16))
    with pytest.raises(ValueError, match=rf'epochs={epochs!r}'):
        fit(epochs, model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), dl, dl)


# --- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('scale', [1., 100., 1e4, 1e30])
def test_logsumexp_and_log_softmax_are_stable(scale):
    x = torch.randn(8, 10) * scale
    assert torch.allclose(logsumexp(x), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)
    ls = log_softmax(x)
    assert ls.isfinite().all()
    assert torch.allclose(ls, F.log_softmax(x, -1), rtol=1e-5, atol=1e-4)
    t = torch.randint(0, 10, (8,))
    assert torch.allclose(cross_entropy(x, t), F.cross_entropy(x, t), rtol=1e-5, atol=1e-4)


def test_naive_forms_overflow_where_ours_does_not():
    x = tensor([[1000., 0., -1000.]])
    assert (x.exp().sum(-1).log()).isinf().all()
    assert torch.equal(logsumexp(x), tensor([1000.]))
    assert torch.equal(log_softmax(x), tensor([[0., -1000., -2000.]]))


def test_logsumexp_infinite_rows_match_torch():
    x = tensor([[float('-inf')]*3, [float('inf'), 0., 1.], [float('-inf'), 0., 1.]])
    assert torch.equal(logsumexp(x), torch.logsumexp(x, -1))


def test_logsumexp_batched_dims():
    x = torch.randn(2, 3, 5) * 50
    assert torch.allclose(logsumexp(x), torch.logsumexp(x, -1))
    assert torch.allclose(log_softmax(x), F.log_softmax(x, -1), atol=1e-5)


def test_nll_and_accuracy():
    inp = tensor([[-1., -2.], [-3., -4.]])
    assert nll(inp, tensor([1, 0])).item() == pytest.approx(2.5)
    acc = accuracy(tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), tensor([1, 0, 0]))
    assert isinstance(acc, torch.Tensor) and acc.item() == pytest.approx(2/3)


# --- labels out of range (issue 12): a clear error naming the label, not negative indexing

@pytest.mark.parametrize('bad', [-1, 10, 12])
def test_nll_rejects_labels_out_of_range(bad):
    inp = F.log_softmax(torch.randn(4, 10), -1)
    targ = tensor([3, bad, 0, 9])
    for f, x in ((nll, inp), (cross_entropy, inp)):
        with pytest.raises(IndexError, match=rf'label {bad} \(at position 1\).*expected labels in 0\.\.9'): f(x, targ)
    assert nll(inp, tensor([0, 9, 5, 1])).isfinite()


# --- second pass: modes kept, whole-batch loaders, the loaders' generators, the confusion matrix

from course_lib.training import evaluating, kept_modes, batch_dl, loader_generators, confusion_matrix
from torch import nn
from torch.utils.data import DataLoader

def test_evaluating_puts_back_every_module_mode_even_after_an_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    m[1].eval()
    with evaluating(m): assert not any(o.training for o in m.modules())
    assert [o.training for o in m.modules()] == [True, True, False, True]
    with pytest.raises(ZeroDivisionError):
        with kept_modes(m): m.eval(); 1/0
    assert [o.training for o in m.modules()] == [True, True, False, True]

def test_batch_dl_gives_the_items_of_one_collate_loader():
    ds = Dataset(torch.arange(20.)[:, None], torch.arange(20))
    ys = [yb for _, yb in batch_dl(ds, 6, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert [len(y) for y in ys] == [6, 6, 6, 2] and sorted(torch.cat(ys).tolist()) == list(range(20))

def test_loader_generators_finds_each_generator_once_wherever_it_is():
    ds = Dataset(torch.zeros(8, 1), torch.zeros(8))
    g1, g2 = torch.Generator(), torch.Generator()
    assert loader_generators(DataLoader(ds, 2, shuffle=True, generator=g1), batch_dl(ds, 2, shuffle=True, generator=g2), DataLoader(ds, 2, generator=g1)) == [g1, g2]
    assert loader_generators(DataLoader(ds, 2)) == []

def test_confusion_matrix_refuses_probabilities_and_mismatched_lengths():
    y = torch.tensor([0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r'expected class indices: pass pred.argmax\(1\)'): confusion_matrix(torch.rand(5, 3), y, 3)
    with pytest.raises(ValueError, match='pass pred.argmax'): confusion_matrix(torch.tensor([0., 1., 1., 2., 2.]), y, 3)
    with pytest.raises(ValueError, match='4 predictions for 5 targets'): confusion_matrix(torch.tensor([0, 1, 1, 2]), y, 3)
    assert confusion_matrix(torch.tensor([0, 1, 2, 2, 2]), y, 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 2]]
