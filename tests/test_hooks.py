import copy, math, gc
from functools import partial
import numpy as np, pytest, torch
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


# --- the course's ListContainer, Hooks as one, and the (means, stds, hists) tuple

def test_list_container_indexing_and_repr():
    t = ListContainer(range(10))
    assert (t[0], t[-1], t[2:4], t[[1, 2]], t[[False] * 8 + [True, False]]) == (0, 9, [2, 3], [1, 2], [8])
    assert t[torch.tensor([True, False] * 5)] == [0, 2, 4, 6, 8] and t[np.array([3, -1])] == [3, 9] and t[np.int64(4)] == 4
    assert t[[]] == []
    assert repr(t) == 'ListContainer (10 items)\n[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]'
    assert repr(ListContainer(range(11))) == 'ListContainer (11 items)\n[0, 1, 2, 3, 4, 5, 6, 7, 8, 9...]'
    with pytest.raises(IndexError, match='a boolean mask of 3 values for 10 items'): t[[True, False, True]]
    with pytest.raises(IndexError): t[[0, 10]]
    t[0] = 'a'
    del t[[1, -1]]; del t[1:3]; del t[0]
    assert list(t) == [4, 5, 6, 7, 8] and len(t) == 5
    del t[[False, True, False, True, False]]
    assert list(t) == [4, 6, 8]
    assert ListContainer(None).items == [] and ListContainer('ab').items == ['ab']

def test_hooks_index_like_a_list_container_and_del_removes_the_hook():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    hooks = Hooks(model, lambda *a: None)
    assert isinstance(hooks, ListContainer) and hooks[0] is hooks.items[0] and len(hooks[[True, False] * 2 + [True]]) == 3
    assert repr(hooks).startswith('Hooks (5 items)\n[Hook(Linear), Hook(ReLU)')
    del hooks[0]
    assert len(hooks) == 4 and not model[0]._forward_hooks and model[1]._forward_hooks
    del hooks[[0, 2]]
    assert not model[1]._forward_hooks and not model[3]._forward_hooks and model[2]._forward_hooks and len(hooks) == 2
    del hooks[:]
    assert n_hooks(model) == 0 and len(hooks) == 0

def test_act_stats_read_as_the_course_tuple():
    st = ActStats(bins=4, lo=0., hi=4.)
    for v in (0.5, 1.5, 2.5): st.update(torch.full((3,), v))
    ms, ss, hi = st
    assert [m.item() for m in ms] == [0.5, 1.5, 2.5] and [s.item() for s in ss] == [0., 0., 0.]
    assert torch.equal(torch.stack(st[2]), st.hists) and all(t.device.type == 'cpu' for t in ms + hi)
    with pytest.raises(ValueError): ms, ss = st  # the course's first version had two lists; the final one has three
