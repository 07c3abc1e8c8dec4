import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.hooks import *
from conftest import image_learn, view, n_hooks


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
    learn = image_learn()
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
    learn = image_learn()
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
