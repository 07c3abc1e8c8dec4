import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.init import init_cnn
from course_lib.cnn import get_cnn_model
from course_lib.accel import *
from conftest import image_data, image_learn, view, make_data, make_learn, max_diff, Steps


class Losses(Callback):
    _order = 20
    def begin_fit(self): self.losses = []
    def after_batch(self):
        if self.in_train: self.losses.append(self.loss.detach().float())

def _two_fits(mp_cb, n_batches=6):
    data = image_data()
    m32 = init_cnn(get_cnn_model(data, [4, 8], leak=0.1, sub=0.4), a=0.1)
    m16 = copy.deepcopy(m32)
    out = []
    for m, cbs in ((m32, []), (m16, [mp_cb])):
        run, learn = Runner([view(), Losses(), *cbs]), image_learn(data, m)
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
    learn = image_learn()
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
    learn = image_learn(model=nn.Sequential(nn.Linear(784, 10), Bad()))
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

def accum_fit(model, bs, cbs, epochs=2):
    data = make_data(n_train=256, bs=bs, generator=torch.Generator().manual_seed(3))
    learn = Learner(model, optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2), F.cross_entropy, data)
    run = Runner(cbs=[Steps] + cbs)
    run.fit(epochs, learn)
    return run

def test_gradient_accumulation_2x32_equals_64():
    m = make_learn(p=0.).model
    m64, m32 = copy.deepcopy(m), copy.deepcopy(m)
    r64, r32 = accum_fit(m64, 64, []), accum_fit(m32, 32, [GradientAccumulation(2)])
    assert r64.steps.n == r32.steps.n == 8 and r32.n_iter == 16
    assert max_diff(m64, m32) < 1e-6
    m32b = copy.deepcopy(m)
    accum_fit(m32b, 32, [])
    assert max_diff(m64, m32b) > 1e-3

def test_gradient_accumulation_steps_at_end_of_uneven_pass():
    data = make_data(n_train=40, bs=8)  # 5 batches: steps after 2, 4 and 5
    run = Runner(cbs=[Steps, GradientAccumulation(2)])
    run.fit(2, make_learn(data))
    assert run.steps.n == 6 and run.n_iter == 10
    with pytest.raises(ValueError, match='n=0'): GradientAccumulation(0)
    with pytest.raises(ValueError, match='n=True'): GradientAccumulation(True)


def test_gradient_accumulation_group_cut_by_an_interrupt_leaks_nothing():
    "Ctrl-C in the middle of an accumulation group: the next fit starts from zero gradients."
    m = make_learn(p=0.).model
    m1, m2 = copy.deepcopy(m), copy.deepcopy(m)
    class CtrlC(Callback):
        def after_pred(self):
            if self.iter == 2: raise KeyboardInterrupt()  # batches 0 and 1 of a group of 4 have added their gradients
    data = lambda: make_data(n_train=64, bs=8, generator=torch.Generator().manual_seed(3))
    learn1 = Learner(m1, optim.SGD(m1.parameters(), lr=0.05), F.cross_entropy, data())
    with pytest.raises(KeyboardInterrupt): Runner(cbs=[GradientAccumulation(4), CtrlC]).fit(1, learn1)
    assert all(p.grad is None or not p.grad.any() for p in m1.parameters())
    learn1.data = data()
    Runner(cbs=GradientAccumulation(4)).fit(1, learn1)
    Runner(cbs=GradientAccumulation(4)).fit(1, Learner(m2, optim.SGD(m2.parameters(), lr=0.05), F.cross_entropy, data()))
    assert max_diff(m1, m2) == 0

def test_gradient_accumulation_drops_the_group_of_a_cancelled_batch():
    "Batch 1 cancelled (before its forward pass) in groups of 2: batch 0's kept gradient goes too, and counting restarts."
    class SkipSecond(Callback):
        def begin_batch(self):
            if self.in_train and self.iter == 1: raise CancelBatchException()
    class Grads(Callback):
        _order = 20
        def begin_fit(self): self.seen = []
        def after_step(self): self.seen.append(self.iter)
    data = make_data(n_train=64, bs=8)  # 8 batches
    run = Runner(cbs=[SkipSecond, GradientAccumulation(2), Grads])
    run.fit(1, make_learn(data))
    assert run.grads.seen == [3, 5, 7]


# --- gradient clipping: on the gradient the step uses, and never letting nan or inf reach the weights

class StepNorm(Callback):
    "The global norm of the gradient each optimizer step used."
    _order = 100
    def begin_fit(self): self.norms = []
    def after_step(self): self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.model.parameters()])))

def lin_data(n=48, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 5
    return DataBunch(*get_dls(Dataset(x, x @ torch.randn(6, 2, generator=g) * 10), Dataset(x[:16], (x @ torch.randn(6, 2, generator=g))[:16]), bs, generator=g))

def clipped_fit(cbs, data=None, lr=0.01):
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    run = Runner([StepNorm(), *cbs])
    run.fit(1, Learner(model, optim.SGD(model.parameters(), lr, momentum=0.9), F.mse_loss, data or lin_data()))
    return run, model

@pytest.mark.parametrize('acc', [1, 3])
def test_clipping_bounds_the_gradient_each_step_uses(acc):
    free = clipped_fit([GradientAccumulation(acc)])[0].step_norm.norms
    clipped = clipped_fit([GradientAccumulation(acc), GradientClipping(1.)])[0].step_norm.norms
    assert max(free) > 10 and max(clipped) <= 1 + 1e-5 and len(clipped) == len(free) == math.ceil(6 / acc)

def test_clipping_acts_on_the_accumulated_gradient_as_a_plain_loop_does():
    "Two batches accumulated, averaged, then clipped once: the plain loop's weights, to rounding (not partial sums clipped)."
    run, model = clipped_fit([GradientAccumulation(2), GradientClipping(1.)])
    torch.manual_seed(0)
    ref = nn.Linear(6, 2); opt = optim.SGD(ref.parameters(), 0.01, momentum=0.9)
    batches = list(lin_data().train_dl)  # the same generator seed: the same order
    for i in range(0, len(batches), 2):
        for xb, yb in batches[i:i+2]: F.mse_loss(ref(xb), yb).backward()
        for p in ref.parameters(): p.grad /= 2
        nn.utils.clip_grad_norm_(ref.parameters(), 1.)
        opt.step(); opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()): assert torch.allclose(p, q, atol=1e-6), (p, q)

def test_clipping_ordered_before_accumulation_would_differ():
    "The planted bug the test above catches: clipping each partial sum gives other weights."
    class EarlyClip(GradientClipping): _order = GradientAccumulation._order - 1
    _, good = clipped_fit([GradientAccumulation(2), GradientClipping(1.)])
    _, bad = clipped_fit([GradientAccumulation(2), EarlyClip(1.)])
    assert max_diff(good, bad) > 1e-3

def test_a_nonfinite_gradient_skips_its_step_and_keeps_the_weights():
    class Poison(Callback):  # a nan in one gradient entry of the third batch, before clipping sees it
        _order = GradientClipping._order - 0.5
        def after_backward(self):
            if self.iter == 2: self.model.weight.grad[0, 0] = math.nan
    class Cancel(Callback):  # the same batch cancelled by hand: what a skipped step must equal
        def after_backward(self):
            if self.iter == 2: raise CancelBatchException()
    with pytest.warns(UserWarning, match='GradientClipping: 1 of 6 steps of epoch 0 changed nothing'):
        run, model = clipped_fit([Poison(), GradientClipping(1.), Steps()])
    ref_run, ref = clipped_fit([Cancel(), GradientClipping(1.)])
    assert run.steps.n == 6 and all(p.isfinite().all() for p in model.parameters())  # it stepped, and put everything back
    assert max_diff(model, ref) == 0
    bufs = lambda r: [st['momentum_buffer'] for st in r.opt.state_dict()['state'].values()]
    assert all(torch.equal(a, b) for a, b in zip(bufs(run), bufs(ref_run)))  # the momentum too, to the bit
    _, lost = clipped_fit([Poison(), GradientClipping(1., skip_nonfinite=False)])
    assert all(p.isnan().all() for p in lost.parameters())  # what the skip prevents: every weight nan

def test_clipping_reads_no_number_per_step(host_reads):
    "The skip of a non-finite step is decided on the device: no host read per step, one per epoch (to warn)."
    from course_lib.cuda import DeviceCallback
    from conftest import HostReads, DEVICE
    for skip, per_epoch in ((False, 0), (True, 1)):
        reads = HostReads(host_reads.cs)
        clipped_fit([DeviceCallback(DEVICE), GradientClipping(1., skip_nonfinite=skip), *reads.cbs])
        assert (reads.in_batches, reads.n) == (0, per_epoch), (skip, reads.in_batches, reads.n)

def test_clipping_unscales_float16_gradients_once():
    "Under a GradScaler (`ScaledOpt`), clipping acts on the true gradients, and the step uses them once."
    from types import SimpleNamespace
    torch.manual_seed(0)
    m, ref = nn.Linear(3, 3), nn.Linear(3, 3)
    ref.load_state_dict(m.state_dict())
    xb = torch.randn(4, 3)
    sc = torch.amp.GradScaler('cpu', init_scale=1024.)
    opt = ScaledOpt(optim.SGD(m.parameters(), 0.1), sc)
    sc.scale((m(xb) ** 2).sum()).backward()
    cb = GradientClipping(1.); cb.set_runner(SimpleNamespace(opt=opt, model=m, cbs=[cb]))
    cb.begin_fit(); cb.begin_epoch(); cb.after_backward()
    assert torch.allclose(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])), torch.tensor(1.), atol=1e-5)
    opt.step()
    (ref(xb) ** 2).sum().backward()
    nn.utils.clip_grad_norm_(ref.parameters(), 1.)
    optim.SGD(ref.parameters(), 0.1).step()
    for p, q in zip(m.parameters(), ref.parameters()): assert torch.allclose(p, q, atol=1e-5)

@pytest.mark.parametrize('bad', [0, -1., True, 'x', None, math.nan])
def test_gradient_clipping_bad_input(bad):
    with pytest.raises(ValueError, match='max_norm'): GradientClipping(bad)


# --- behaviour the mutation run found unpinned (issue 30)

def test_float16_on_a_gpu_model_steps_through_the_scaler_and_gives_the_optimizer_back(host_reads):
    "On CUDA (the stand-in) float16 wraps the optimizer in a `ScaledOpt` with a `GradScaler`, scales the loss it backpropagates, reports the plain one."
    from course_lib.cuda import DeviceCallback
    from conftest import DEVICE
    class Seen(Callback):
        _order = 12  # after MixedPrecision's after_loss: the loss backward() gets
        def begin_fit(self): self.opts, self.scaled, self.reported, self.dtypes = [], [], [], []
        def after_pred(self): self.dtypes.append(self.pred.dtype)
        def after_loss(self):
            if self.in_train: self.opts.append(self.opt); self.scaled.append(self.loss.detach().cpu())
        def after_batch(self):
            if self.in_train: self.reported.append(self.loss.detach().cpu())
    learn = image_learn()
    orig, mp = learn.opt, MixedPrecision(torch.float16)
    run = Runner([DeviceCallback(DEVICE), view(), mp, Seen()])
    run.fit(1, learn)
    assert all(isinstance(o, ScaledOpt) and o.opt is orig and isinstance(o.scaler, torch.amp.GradScaler) for o in run.seen.opts)
    assert learn.opt is orig and mp.scaler is None  # given back after the fit
    ratio = torch.stack(run.seen.scaled) / torch.stack(run.seen.reported)
    assert (ratio > 1000).all()  # the scaler's factor (2**16 to start) on the loss that is backpropagated, not on the one reported

def test_autocast_uses_the_dtype_asked_for_and_is_left_after_a_cancelled_batch():
    class Dtype(Callback):
        def begin_fit(self): self.dtypes = []
        def after_pred(self): self.dtypes.append(self.pred.dtype)
    class CancelSecond(Callback):
        _order = 11
        def after_pred(self):
            if self.in_train and self.iter == 1: raise CancelBatchException()
        def after_batch(self): self.autocast_after = torch.is_autocast_enabled('cpu')
    run = Runner([view(), MixedPrecision(torch.bfloat16), Dtype(), CancelSecond()])
    run.fit(1, image_learn())
    assert set(run.dtype.dtypes) == {torch.bfloat16}
    assert not torch.is_autocast_enabled('cpu') and run.cancel_second.autocast_after is False  # left in the cancelled batch too

def test_clipping_defaults_to_a_norm_of_one_and_counts_every_skipped_step():
    assert GradientClipping().max_norm == 1. and GradientClipping().skip_nonfinite
    class Poison(Callback):
        _order = GradientClipping._order - 0.5
        def after_backward(self):
            if self.iter in (1, 4): self.model.weight.grad[0, 0] = math.nan
    with pytest.warns(UserWarning, match='GradientClipping: 2 of 6 steps of epoch 0 changed nothing'):
        clipped_fit([Poison(), GradientClipping()])

def test_a_fit_cut_short_mid_epoch_still_says_what_it_skipped():
    class Poison(Callback):
        _order = GradientClipping._order - 0.5
        def after_backward(self):
            if self.iter == 1: self.model.weight.grad[0, 0] = math.inf
    class Stop(Callback):
        def after_batch(self):
            if self.iter == 2: raise CancelTrainException()
    with pytest.warns(UserWarning, match='1 of 3 steps of the epoch the fit stopped in changed nothing'):
        clipped_fit([Poison(), GradientClipping(), Stop()])
