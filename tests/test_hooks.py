import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F

from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.init import init_cnn
from course_lib.hooks import *

N, BS = 96, 16  # 6 training batches of 16, 2 validation batches of 32

def _data(n=N, bs=BS):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataBunch(*get_dls(Dataset(x, y), Dataset(x[:n//2], y[:n//2]), bs), 10)

def _learn(data=None, model=None, lr=0.1):
    data = data or _data()
    model = model or get_cnn_model(data, [4, 8])
    return Learner(model, optim.SGD(model.parameters(), lr=lr), F.cross_entropy, data)

view = partial(BatchTransformXCallback, view_tfm(1, 28, 28))
def n_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())

# ---- device and batch transforms

def test_device_callback_moves_model_and_batches_non_blocking(monkeypatch):
    calls, to = [], torch.Tensor.to
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get('non_blocking'))
        return to(self, *args, **kwargs)
    learn = _learn()
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
    data = _data()
    x4 = data.train_ds.x.view(-1, 1, 28, 28).expand(-1, 3, -1, -1).contiguous()
    data = DataBunch(*get_dls(Dataset(x4, data.train_ds.y), Dataset(x4[:32], data.train_ds.y[:32]), BS), 10)
    model = get_cnn_model(data, [4, 8], ni=3)
    class Fmt(Callback):
        _order = 5
        def after_pred(self): self.cl = self.xb.is_contiguous(memory_format=torch.channels_last)
    run = Runner([DeviceCallback('cpu', channels_last=True), Fmt()])
    run.fit(1, _learn(data, model))
    assert model[0][0].weight.is_contiguous(memory_format=torch.channels_last) and run.fmt.cl

def test_view_tfm_and_batch_transform_errors():
    assert view_tfm(1, 28, 28)(torch.zeros(5, 784)).shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match='size='): view_tfm()
    with pytest.raises(ValueError, match='size='): view_tfm(1, -28, 28)
    with pytest.raises(TypeError, match='not callable'): BatchTransformXCallback(None)

# ---- hooks

def test_hook_removed_on_exit_exception_remove_and_del():
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with Hook(lin, lambda *a: None): raise RuntimeError
    assert not lin._forward_hooks
    h = Hook(lin, lambda *a: None); h.remove(); h.remove()
    assert not lin._forward_hooks
    h = Hook(lin, lambda *a: None); del h; gc.collect()
    assert not lin._forward_hooks
    hs = Hooks([lin, nn.ReLU()], lambda *a: None); del hs
    assert not lin._forward_hooks

def test_hooks_bad_module_registers_nothing():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="3 is not an nn.Module"): Hooks([lin, 3], lambda *a: None)
    assert not lin._forward_hooks

def test_hooks_callback_removes_hooks_after_a_fit_that_raised():
    learn = _learn()
    def bad_loss(pred, yb):
        if bad_loss.n == 2: raise ValueError('bad batch')
        bad_loss.n += 1
        return F.cross_entropy(pred, yb)
    bad_loss.n = 0
    learn.loss_func = bad_loss
    run = Runner([view(), HooksCallback(append_stats)])
    with pytest.raises(ValueError, match='bad batch'): run.fit(2, learn)
    assert n_hooks(learn.model) == 0
    assert [h.stats.n for h in run.hooks] == [3] * len(learn.model)  # 3 forwards before the loss raised

def test_hooks_callback_after_fit_when_begin_fit_never_ran():
    class Early(Callback):
        _order = -1
        def begin_fit(self): raise RuntimeError('early')
    learn = _learn()
    with pytest.raises(RuntimeError, match='early'): Runner([Early(), HooksCallback()]).fit(1, learn)
    assert n_hooks(learn.model) == 0

def test_act_stats_bounded_rows_and_values():
    st = ActStats(bins=10, lo=-5., hi=5.)
    o = torch.randn(8, 4, 6, 6)
    for _ in range(200): st.update(o)
    assert st.n == 200 and len(st.buf) == 256 and st.rows.shape == (200, 12)
    m, s = stats(o)
    assert torch.allclose(st.means, torch.full((200,), m), atol=1e-5) and torch.allclose(st.stds, torch.full((200,), s), atol=1e-5)
    assert torch.allclose(st.hists[0], torch.histc(o, 10, -5, 5))
    assert torch.allclose(st.near_zero(0.6), ((o.abs() < 1).sum() / st.hists[0].sum()).expand(200))  # bins [-1,0), [0,1)

def test_append_stats_only_in_training():
    lin = nn.Linear(3, 3)
    with Hook(lin, append_stats) as h:
        lin(torch.randn(4, 3)); lin.eval(); lin(torch.randn(4, 3))
    assert h.stats.n == 1

# ---- no syncs in the per-batch path

SYNCS = ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__float__', '__int__')

@pytest.fixture
def sync_counter(monkeypatch):
    "Counts tensor->Python reads made between the first `begin_batch` and the last `after_batch` callback of each batch."
    counts = {'on': False, 'n': 0}
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)
        def wrapped(self, *args, _orig=orig, **kwargs):
            if counts['on']: counts['n'] += 1
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    class On(Callback):
        _order = -100
        def begin_batch(self): counts['on'] = True
    class Off(Callback):
        _order = 100
        def after_batch(self): counts['on'] = False
    return counts, [On(), Off()]

def test_no_sync_per_batch(sync_counter):
    counts, probes = sync_counter
    run = Runner([DeviceCallback('cpu'), view(), HooksCallback(append_stats), MixedPrecision(), ProgressCallback(show=False), *probes])
    run.fit(2, _learn())
    assert counts['n'] == 0

def test_progress_syncs_only_at_display(sync_counter, capsys):
    counts, probes = sync_counter
    run = Runner([view(), ProgressCallback(show=True, every=4), *probes])
    run.fit(1, _learn())
    # 6 training batches: the loss is read at batch 4 and at the end of the pass (6); none in validation
    assert counts['n'] == 2
    assert 'loss ' in capsys.readouterr().out

# ---- mixed precision

class Losses(Callback):
    _order = 20
    def begin_fit(self): self.losses = []
    def after_batch(self):
        if self.in_train: self.losses.append(self.loss.detach().float())

def _two_fits(mp_cb, n_batches=6):
    data = _data()
    m32 = init_cnn(get_cnn_model(data, [4, 8], leak=0.1, sub=0.4), a=0.1)
    m16 = copy.deepcopy(m32)
    out = []
    for m, cbs in ((m32, []), (m16, [mp_cb])):
        run, learn = Runner([view(), Losses(), *cbs]), _learn(data, m)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            run.fit(1, learn)
        out.append((torch.stack(run.losses.losses), learn))
    return out

def test_bf16_losses_close_and_master_weights_fp32():
    (l32, _), (l16, learn) = _two_fits(MixedPrecision())
    assert len(l16) == 6
    assert (l16 - l32).abs().max() < 0.05  # bf16 has ~3 significant digits; 6 batches of drift stay within this
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}
    assert not torch.is_autocast_enabled('cpu')

def test_fp16_refused_on_cpu():
    learn = _learn()
    with pytest.raises(ValueError, match='float16 mixed precision needs CUDA'): Runner([view(), MixedPrecision(torch.float16)]).fit(1, learn)
    assert type(learn.opt) is optim.SGD and not torch.is_autocast_enabled('cpu')
    with pytest.raises(ValueError, match='dtype=torch.float64'): MixedPrecision(torch.float64)

class CPUHalf(MixedPrecision):
    "The fp16 path with a CPU GradScaler, to test the scaling logic without a GPU."
    def begin_fit(self):
        self.scaler = torch.amp.GradScaler('cpu', init_scale=2.**10)
        self.learn.opt = ScaledOpt(self.opt, self.scaler)

def test_fp16_scaling_path_on_cpu():
    mp = CPUHalf(torch.float16)
    (l32, _), (l16, learn) = _two_fits(mp)
    assert (l16 - l32).abs().max() < 0.05       # the recorded losses are the unscaled ones
    assert type(learn.opt) is optim.SGD and mp.scaler is None
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}

def test_autocast_left_when_forward_raises():
    class Bad(nn.Module):
        def forward(self, x): raise RuntimeError('forward failed')
    learn = _learn(model=nn.Sequential(nn.Linear(784, 10), Bad()))
    with pytest.raises(RuntimeError, match='forward failed'): Runner([MixedPrecision()]).fit(1, learn)
    assert not torch.is_autocast_enabled('cpu')

def test_scaled_opt_skips_non_finite_steps():
    p = nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler('cpu', init_scale=4.)
    sopt = ScaledOpt(optim.SGD([p], lr=0.5), scaler)
    scaler.scale((p * 2).sum()).backward()
    sopt.step(); sopt.zero_grad()
    assert torch.allclose(p.detach(), torch.zeros(3)) and p.grad is None  # grads unscaled: 1 - 0.5*2
    p.grad = torch.tensor([1., float('inf'), 1.])
    sopt.step()
    assert torch.allclose(p.detach(), torch.zeros(3)) and scaler.get_scale() == 2.  # skipped, scale halved
    assert sopt.param_groups is sopt.opt.param_groups

# ---- progress bar

def test_progress_silent_in_ci(monkeypatch, capsys):
    monkeypatch.setenv('CI', 'true')
    run = Runner([view(), ProgressCallback()])
    run.fit(1, _learn())
    assert capsys.readouterr().out == '' and run.progress.rows == []

def test_progress_table_rows(capsys):
    run = Runner([view(), AvgStatsCallback(accuracy, silent=True), ProgressCallback(show=True)])
    run.fit(2, _learn())
    rows = run.progress.rows
    assert [r['epoch'] for r in rows] == [0, 1] and 'valid_accuracy' in rows[0] and 'time' in rows[0]
    run = Runner([view(), ProgressCallback(show=True)])
    run.fit(1, _learn())
    assert list(run.progress.rows[0]) == ['epoch', 'smooth_loss', 'time']
    with pytest.raises(ValueError, match='every=0'): ProgressCallback(every=0)

# ---- GeneralRelu, model builders

def test_general_relu():
    x = torch.linspace(-3, 8, 12)
    assert torch.equal(GeneralRelu()(x), F.relu(x))
    assert torch.allclose(GeneralRelu(leak=0.1)(x), F.leaky_relu(x, 0.1))
    assert GeneralRelu(sub=0.5, maxv=6.)(x).max() == 6. and GeneralRelu(sub=0.5)(x).min() == -0.5
    with pytest.raises(ValueError, match='leak=-1'): GeneralRelu(leak=-1)

def test_get_learn_run_kaiming_for_leak():
    learn, run = get_learn_run([16, 16], _data(), 0.3, cbs=[view], leak=0.1)
    w = learn.model[1][0].weight
    assert abs(w.std().item() - math.sqrt(2 / (1 + 0.1**2) / w[0].numel())) < 0.02
    assert learn.opt.param_groups[0]['lr'] == 0.3 and any(isinstance(cb, BatchTransformXCallback) for cb in run.cbs)
    with pytest.raises(ValueError, match='nfs='): get_cnn_layers(_data(), [8, 0])

# ---- model summary

def test_model_summary_restores_state():
    learn = _learn()
    learn.model.train()
    run = Runner([view(), MixedPrecision()])
    s = model_summary(run, learn)
    assert [r[2] for r in s.rows][:2] == ['4x14x14', '4x14x14'] and s.rows[-1][2] == '10'
    assert learn.model.training and n_hooks(learn.model) == 0 and not torch.is_autocast_enabled('cpu')
    assert s.total == sum(p.numel() for p in learn.model.parameters()) and 'Total params' in repr(s)

def test_model_summary_tuple_outputs_and_chosen_modules():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(784, 5, batch_first=True), nn.Linear(5, 10)
        def forward(self, x): return self.out(self.rnn(x[:, None])[0][:, -1])
    model = Seq()
    s = model_summary(Runner(), _learn(model=model))
    assert s.rows[0][:3] == ('rnn', 'LSTM', '1x5, 32x5, 32x5')  # output, then h and c (layers x bs x nh), first dim dropped
    s = model_summary(Runner(), _learn(model=model), mods=[model.out])
    assert [r[0] for r in s.rows] == ['out']

def test_sync_counter_sees_a_sync(sync_counter):
    "The probe is real: a callback that reads the loss every batch is counted."
    counts, probes = sync_counter
    class Reads(Callback):
        def after_loss(self): self.last = self.loss.item()
    Runner([view(), Reads(), *probes]).fit(1, _learn())
    assert counts['n'] == 6 + 2
