import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.cuda import *
from course_lib.datasets import normalize_to
from course_lib.cnn import get_cnn_model
from course_lib.hooks import HooksCallback, append_stats
from course_lib.accel import MixedPrecision
from course_lib.progress import ProgressCallback
from conftest import image_data, image_learn, view, BS, DEVICE


def test_device_callback_moves_model_and_batches_non_blocking(monkeypatch):
    calls, to = [], torch.Tensor.to
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get('non_blocking'))
        return to(self, *args, **kwargs)
    learn = image_learn()
    class Where(Callback):
        _order = 5
        def begin_fit(self): self.devs = set()
        def after_pred(self): self.devs.add((self.xb.device.type, self.yb.device.type))
    run = Runner([DeviceCallback('meta'), view(), Where()])
    monkeypatch.setattr(torch.Tensor, 'to', spy)
    run.fit(1, learn)
    monkeypatch.undo()
    assert {p.device.type for p in learn.model.parameters()} == {'meta'}
    assert run.where.devs == {('meta', 'meta')}
    assert calls.count(True) == 2 * (6 + 2)  # xb and yb of every batch, all non-blocking

def test_device_callback_default_and_bad_device(monkeypatch):
    monkeypatch.setenv('COURSE_DEVICE', 'cpu')
    assert DeviceCallback().device == torch.device('cpu') and CudaCallback is DeviceCallback
    with pytest.raises(ValueError, match="device='tpu9'"): DeviceCallback('tpu9')

def test_channels_last_model_and_4d_batches():
    data = image_data()
    x4 = data.train_ds.x.view(-1, 1, 28, 28).expand(-1, 3, -1, -1).contiguous()
    data = DataBunch(*get_dls(Dataset(x4, data.train_ds.y), Dataset(x4[:32], data.train_ds.y[:32]), BS), 10)
    model = get_cnn_model(data, [4, 8], ni=3)
    class Fmt(Callback):
        _order = 5
        def after_pred(self): self.cl = self.xb.is_contiguous(memory_format=torch.channels_last)
    run = Runner([DeviceCallback('cpu', channels_last=True), Fmt()])
    run.fit(1, image_learn(data, model))
    assert model[0][0].weight.is_contiguous(memory_format=torch.channels_last) and run.fmt.cl

def test_view_tfm_and_batch_transform_errors():
    assert view_tfm(1, 28, 28)(torch.zeros(5, 784)).shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match='size='): view_tfm()
    with pytest.raises(ValueError, match='size='): view_tfm(1, -28, 28)
    with pytest.raises(TypeError, match='not callable'): BatchTransformXCallback(None)

def test_no_sync_per_batch(host_reads):
    run = Runner([DeviceCallback(DEVICE), view(), HooksCallback(append_stats), MixedPrecision(), ProgressCallback(show=False), *host_reads.cbs])
    run.fit(2, image_learn())
    assert host_reads.in_batches == 0 and host_reads.n == 0  # nothing read back: the hooks keep their statistics on the device

def test_the_host_read_counter_sees_a_sync(host_reads):
    "The probe is real: a callback that reads the loss every batch is counted, on the device only."
    class Reads(Callback):
        def after_loss(self): self.last = self.loss.item()
    Runner([DeviceCallback(DEVICE), view(), Reads(), *host_reads.cbs]).fit(1, image_learn())
    assert host_reads.in_batches == 6 + 2
    before = host_reads.n
    Runner([DeviceCallback('cpu'), view(), Reads()]).fit(1, image_learn())
    assert host_reads.n == before  # a CPU tensor's read is no GPU sync


# --- the course's helpers of lesson 5: normalize_to, Lambda, flatten, get_runner

def test_normalize_to_uses_the_training_statistics():
    tr, va = torch.rand(100, 4) * 3 + 1, torch.rand(20, 4)
    ntr, nva = normalize_to(tr, va)
    assert abs(ntr.mean().item()) < 1e-5 and ntr.std().item() == pytest.approx(1, abs=1e-5)
    assert torch.allclose(nva, (va - tr.mean()) / tr.std())

def test_lambda_and_flatten():
    import pickle
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(Lambda(flatten)(x), x.view(4, 12)) and torch.equal(flatten(x.contiguous(memory_format=torch.channels_last)), x.reshape(4, 12))
    m = pickle.loads(pickle.dumps(nn.Sequential(Lambda(flatten), nn.Linear(12, 2))))
    assert m(x).shape == (4, 2) and repr(m[0]) == 'Lambda(flatten)'
    with pytest.raises(Exception, match='pickle'): pickle.dumps(Lambda(lambda x: x))
    with pytest.raises(TypeError, match='not callable'): Lambda(None)

def test_get_runner_defaults_are_the_course_s():
    model = nn.Linear(784, 10)
    learn, run = get_runner(model, image_data(), cbs=[view])
    assert type(learn.opt) is optim.SGD and learn.opt.defaults['lr'] == 0.6 and learn.opt.defaults['momentum'] == 0
    assert learn.loss_func is F.cross_entropy and learn.model is model and isinstance(run, Runner)
    learn, _ = get_runner(model, image_data(), lr=0.01, opt_func=optim.Adam, loss_func=F.nll_loss)
    assert type(learn.opt) is optim.Adam and learn.opt.defaults['lr'] == 0.01 and learn.loss_func is F.nll_loss

def test_prepare_batch_replays_the_pipeline_in_order_and_skips_what_it_is_told():
    from types import SimpleNamespace
    class Double(BatchTransformXCallback): _order = 3
    cbs = [Double(lambda x: x * 2), BatchTransformXCallback(lambda x: x + 1), DeviceCallback('meta')]
    xb, yb = prepare_batch(cbs, torch.ones(2, 3), torch.zeros(2))
    assert xb.device.type == 'meta' and yb.device.type == 'meta'
    xb, yb = prepare_batch(cbs, torch.ones(2, 3), torch.zeros(2), skip=DeviceCallback)
    assert torch.equal(xb, torch.full((2, 3), 4.))  # (1 + 1) * 2: order 2 before order 3
    assert torch.equal(prepare_batch(cbs, torch.ones(2, 3), torch.zeros(2), skip=(DeviceCallback, Double))[0], torch.full((2, 3), 2.))
