"Lesson 6a: char RNN models, cells, state handling, clipping, checkpoints per cycle and sampling (`course_lib.rnn`)."
import re
from functools import partial
import pytest, torch
from torch import nn, optim
from course_lib.core import test_near
from course_lib.text import Vocab, LMLoader
from course_lib.rnn import *
from course_lib.callbacks import Runner, Learner, DataBunch, AvgStatsCallback, Callback
from course_lib.anneal import Recorder, SGDRCallback, sgdr_cycles
from course_lib.accel import GradientClipping
from course_lib.checkpoint import Checkpoint

D = torch.float64

@pytest.mark.parametrize('ours,theirs,pair', [(RnnCell, nn.RNNCell, False), (GruCell, nn.GRUCell, False), (LstmCell, nn.LSTMCell, True)])
@pytest.mark.parametrize('ni,nh,bs', [(3, 5, 1), (11, 13, 7), (42, 64, 16)])
def test_cells_match_pytorch(ours, theirs, pair, ni, nh, bs):
    torch.manual_seed(ni)
    a = theirs(ni, nh).to(D)
    b = ours(ni, nh).to(D)
    assert [(k, p.shape) for k, p in b.named_parameters()] == [(k, p.shape) for k, p in a.named_parameters()]
    b.load_state_dict(a.state_dict())
    h = torch.randn(bs, nh, dtype=D)
    ha = hb = (h, torch.randn(bs, nh, dtype=D)) if pair else h
    for _ in range(6):
        x = torch.randn(bs, ni, dtype=D)
        ha, hb = a(x, ha), b(x, hb)
        for u, v in (zip(ha, hb) if pair else [(ha, hb)]): test_near(v, u, 1e-12)

def test_cell_functions_match_pytorch_functional_weights():
    torch.manual_seed(0)
    cell = nn.GRUCell(4, 6).to(D)
    x, h = torch.randn(3, 4, dtype=D), torch.randn(3, 6, dtype=D)
    test_near(gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), cell(x, h), 1e-12)

def test_cell_init_like_pytorch():
    torch.manual_seed(0); c = GruCell(30, 400)
    for p in c.parameters(): assert p.abs().max() <= 1 / 400 ** 0.5 and p.std() > 0.8 / (3 * 400) ** 0.5

def copy_rnn(src, dst):
    dst.load_state_dict({re.sub(r'(rnn\.\w+)_l0$', r'\1', k): v for k, v in src.state_dict().items()})
    return dst

def batches(n=3, bs=4, sl=6, vs=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vs, (bs, sl), generator=g) for _ in range(n)]

@pytest.mark.parametrize('cls,cell', [(CharSeqStatefulRnn, nn.RNNCell), (CharSeqStatefulRnn, RnnCell), (CharSeqStatefulGRU, GruCell), (CharSeqStatefulGRU, nn.GRUCell)])
def test_unrolled_loop_matches_layer(cls, cell):
    torch.manual_seed(0)
    m1 = cls(12, 5, nh=9).to(D)
    m2 = copy_rnn(m1, CharSeqStatefulRnn2(12, 5, nh=9, cell=cell).to(D))
    for xb in batches(): test_near(m2(xb), m1(xb), 1e-10)
    test_near(m2.h, m1.h, 1e-10)

def test_lstm_is_two_unrolled_lstm_cells():
    "In eval mode (no dropout), the 2-layer `nn.LSTM` is two `LstmCell`s, layer after layer, carrying (h, c)."
    torch.manual_seed(0)
    m = CharSeqStatefulLSTM(12, 5, nh=8).to(D).eval()
    c1, c2 = LstmCell(5, 8).to(D), LstmCell(8, 8).to(D)
    sd = m.rnn.state_dict()
    for c, l in ((c1, 0), (c2, 1)): c.load_state_dict({k: sd[f'{k}_l{l}'] for k in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')})
    s1 = s2 = (torch.zeros(4, 8, dtype=D),) * 2
    for xb in batches():
        outs = []
        for x in m.e(xb).unbind(1):
            s1 = c1(x, s1); s2 = c2(s1[0], s2); outs.append(s2[0])
        test_near(m(xb), torch.log_softmax(m.l_out(torch.stack(outs, 1)), -1).view(-1, 12), 1e-10)
    test_near(m.h[0], torch.stack([s1[0], s2[0]]), 1e-10); test_near(m.h[1], torch.stack([s1[1], s2[1]]), 1e-10)

def test_output_dropout():
    "`p_out` drops the last layer's outputs while training, nothing while evaluating, and adds no weights (old files load)."
    torch.manual_seed(0)
    m, plain = CharSeqStatefulLSTM(12, 5, nh=8, p_out=0.5), CharSeqStatefulLSTM(12, 5, nh=8)
    assert list(m.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(m.state_dict()); m.eval(); plain.eval()
    xb = batches(1)[0]
    test_near(m(xb), plain(xb), 0)
    m.train(); m.rnn.dropout = 0.; m.reset()              # only the output dropout left
    outp = m.rnn(m.e(xb))[0]; m.reset()
    torch.manual_seed(1); y = m(xb)
    torch.manual_seed(1); kept = m.drop(torch.ones_like(outp)) > 0
    test_near(y, torch.log_softmax(m.l_out(outp * kept * 2), -1).view(-1, 12), 1e-6)
    assert 0 < kept.float().mean() < 1
    with pytest.raises(ValueError, match='1.5'): CharSeqStatefulLSTM(12, 5, nh=8, p_out=1.5)

@pytest.mark.parametrize('cls', [CharSeqStatefulRnn, CharSeqStatefulRnn2, CharSeqStatefulGRU, CharSeqStatefulLSTM])
def test_state_kept_detached_and_reset(cls):
    torch.manual_seed(0)
    m = cls(12, 5, nh=7).eval()  # no dropout: the same input gives the same output
    xs = batches()
    m(xs[0])
    for h in (m.h if isinstance(m.h, tuple) else (m.h,)): assert h.grad_fn is None and not h.requires_grad and h.shape[1:] == (4, 7)
    h0 = repackage(m.h)
    out = m(xs[1])
    out.sum().backward()                                              # the graph stops at the state: one batch deep
    m.reset(); assert m.h is None
    ref = m(xs[1])
    assert not torch.allclose(out, ref)                               # from zeros it differs: the state carried over
    m.h = h0; test_near(m(xs[1]), out, 1e-6)
    m(xs[2][:2])                                                      # a new batch size: zeros for the new rows
    assert (m.h[0] if isinstance(m.h, tuple) else m.h).shape[1] == 2

def test_window_models_shapes():
    xb = torch.randint(0, 12, (5, 3))
    for m in (Char3Model(12, 4, 6), Char3Model(12, 4, 6, concat=True), CharLoopModel(12, 4, 6), CharRnn(12, 4, 6)):
        out = m(xb)
        assert out.shape == (5, 12)
        test_near(out.exp().sum(1), torch.ones(5), 1e-5)
    assert CharSeqRnn(12, 4, 6)(xb).shape == (15, 12)
    assert CharLoopModel(12, 4, 6)(torch.randint(0, 12, (5, 8))).shape == (5, 12)
    with pytest.raises(ValueError, match=r'shape \(bs, 3\), got \(5, 4\)'): Char3Model(12, 4, 6)(torch.randint(0, 12, (5, 4)))

class Resets(Callback):
    _order = 5
    def begin_fit(self): self.log = []
    def begin_epoch(self): self.log.append(('train', self.model.h))
    def begin_validate(self): self.log.append(('valid', self.model.h))

def lm_data(n=3000, bs=8, seed=0):
    ids = torch.randint(1, 12, (n,), generator=torch.Generator().manual_seed(seed))
    return DataBunch(LMLoader(ids, bs, 6, seed=seed), LMLoader(ids[:n // 2], bs, 6, rand_bptt=False))

def test_reset_state_callback():
    torch.manual_seed(0)
    m = CharSeqStatefulGRU(12, 4, nh=6)
    run = Runner(cb_funcs=[ResetState, Resets])
    run.fit(2, Learner(m, optim.Adam(m.parameters(), 1e-2), seq_nll, lm_data()))
    assert [k for k, _ in run.resets.log] == ['train', 'valid'] * 2 and all(h is None for _, h in run.resets.log)

def test_sgdr_cycle_files_and_resume(tmp_path):
    "A run resumed from a cycle file continues the schedule: same learning rates, same final weights."
    def sgdr(path, resume=False):
        torch.manual_seed(0)
        m = CharSeqStatefulLSTM(12, 4, nh=8)
        run = Runner(cb_funcs=[partial(AvgStatsCallback, silent=True), ResetState, partial(GradientClipping, 1.), Recorder,
                               partial(SGDRCallback, 1e-2, 0., 3, cycle_mult=2), partial(Checkpoint, path, every_epoch=False, monitor=None, resume=resume)])
        run.fit(7, Learner(m, optim.Adam(m.parameters(), 1e-2), seq_nll, lm_data(n=1000)))
        return run, m
    run_a, ma = sgdr(tmp_path/'a')
    assert sorted(f.name for f in (tmp_path/'a').iterdir()) == ['cycle_0.pth', 'cycle_1.pth', 'cycle_2.pth']
    for k in (0, 1):
        run_b, mb = sgdr(tmp_path/f'b{k}', resume=tmp_path/'a'/f'cycle_{k}.pth')
        assert run_b.start_epoch == sum(sgdr_cycles(k + 1, cycle_mult=2))
        assert run_b.recorder.lrs == run_a.recorder.lrs
        for p, q in zip(ma.parameters(), mb.parameters()): assert torch.equal(p, q)

def test_sampling():
    v = Vocab('abc ')
    torch.manual_seed(0)
    m = CharSeqStatefulGRU(len(v), 3, nh=8)
    m.train()
    s = get_next_n(m, v, 'ab', 20, 0.7, torch.Generator().manual_seed(1))
    assert len(s) == 22 and s.startswith('ab') and set(s) <= set('abc ')
    assert s == get_next_n(m, v, 'ab', 20, 0.7, torch.Generator().manual_seed(1))
    assert m.training and m.h is None                                   # mode and state put back
    assert get_next_n(m, v, 'ab', 0) == 'ab' and get_next(m, v, 'ab') in 'abc '
    with torch.no_grad(): m.l_out.bias.copy_(torch.tensor([50., 0., 0., 0., 40.]))  # index 0 would win: never drawn
    assert get_next_n(m, v, 'a', 30, 1.) == 'a' + 'c' * 30

def test_sampling_temperature():
    "A low temperature draws the most likely character almost always; a high one spreads the draws."
    v = Vocab('abcd')
    m = CharSeqStatefulRnn(len(v), 3, nh=4)
    with torch.no_grad(): m.l_out.weight.zero_(); m.l_out.bias.copy_(torch.tensor([0., 2., 1., 0., 0.]))
    cold = get_next_n(m, v, 'a', 300, 0.1, torch.Generator().manual_seed(0))[1:]
    hot = get_next_n(m, v, 'a', 300, 10., torch.Generator().manual_seed(0))[1:]
    assert cold.count('a') > 290 and all(hot.count(c) > 40 for c in 'abcd')

@pytest.mark.parametrize('kwargs,msg', [(dict(temperature=0), 'temperature=0'), (dict(temperature=-1.), 'temperature=-1.0'),
                                        (dict(text=''), 'non-empty'), (dict(text='aXb'), r"\['X'\]"), (dict(n=-1), 'n=-1'), (dict(n=2.), 'n=2.0')])
def test_sampling_bad_input(kwargs, msg):
    v = Vocab('abc ')
    args = dict(model=CharSeqStatefulRnn(len(v), 3, nh=4), vocab=v, text='ab', n=3) | kwargs
    with pytest.raises(ValueError, match=msg): get_next_n(**args)

def test_sampling_needs_a_stateful_model():
    v = Vocab('abc')
    with pytest.raises(TypeError, match='reset'): get_next(CharRnn(len(v), 3, 4), v, 'ab')
