"Lesson 6a's failure paths (issues 22 and 23): sampling with another vocabulary or a vanishing temperature, stateful models cast, moved or run under inference mode, an LSTM cell in the written-out loop, resuming without `ResetState`, and the 2018 positional call."
import copy, math
import pytest, torch
from torch import nn, optim
from course_lib.text import Vocab, LMLoader
from course_lib.rnn import *
from course_lib.callbacks import Learner, DataBunch
from course_lib.anneal import fit_sgdr
from course_lib.checkpoint import Checkpoint

STATEFUL = [CharSeqStatefulRnn, CharSeqStatefulRnn2, CharSeqStatefulGRU, CharSeqStatefulLSTM]

def batches(n=3, bs=4, sl=6, vs=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vs, (bs, sl), generator=g) for _ in range(n)]

def each(h, f): return tuple(f(o) for o in h) if isinstance(h, tuple) else f(h)
def same(h, k): return all(torch.equal(a, b) for a, b in zip(h if isinstance(h, tuple) else (h,), k if isinstance(k, tuple) else (k,)))

# --- sampling

def peaked(v, scores):
    "A stateful RNN over vocabulary `v` that always predicts softmax(`scores`)."
    m = CharSeqStatefulRnn(len(v), 3, nh=4)
    with torch.no_grad(): m.l_out.weight.zero_(); m.l_out.bias.copy_(torch.tensor(scores))
    return m

@pytest.mark.parametrize('t', [1e-40, 1e-300, 5e-324])
def test_vanishing_temperature_is_greedy(t):
    "A temperature so small that softmax would underflow draws the most likely character every time, whatever the generator."
    v = Vocab('abcd')
    m = peaked(v, [0., 2., 1., 1.9, 0.])  # 'a' most likely, 'c' close behind
    for seed in range(3): assert get_next_n(m, v, 'b', 30, t, torch.Generator().manual_seed(seed)) == 'b' + 'a' * 30

@pytest.mark.parametrize('t', [math.inf, math.nan, 0., -1e-40])
def test_temperature_outside_the_range_refused(t):
    v = Vocab('abcd')
    with pytest.raises(ValueError, match=f'temperature={t!r}, expected a number > 0'): get_next_n(peaked(v, [0.] * 5), v, 'a', 3, t)

@pytest.mark.parametrize('nv', [7, 3])
def test_sampling_vocabulary_of_another_size(nv):
    "A model trained with another vocabulary: both sizes named, before any character is drawn."
    v = Vocab('abc ')  # 5 tokens with index 0
    with pytest.raises(ValueError, match=f'the model predicts {nv} tokens, the vocabulary has 5'): get_next_n(CharSeqStatefulGRU(nv, 3, nh=8), v, 'a', 5)

class Wrapped(nn.Module):
    "A stateful model without `vocab_sz`: sampling checks its output instead."
    def __init__(self, nv): super().__init__(); self.m = CharSeqStatefulGRU(nv, 3, nh=8)
    def reset(self): self.m.reset()
    def forward(self, xb): return self.m(xb)

def test_sampling_vocabulary_checked_on_the_output():
    v = Vocab('abc ')
    with pytest.raises(ValueError, match='the model predicts 7 tokens, the vocabulary has 5'): get_next_n(Wrapped(7), v, 'ab', 5)
    assert len(get_next_n(Wrapped(5), v, 'ab', 5)) == 7

# --- stateful models moved, cast, run under inference mode

@pytest.mark.parametrize('cls', STATEFUL)
def test_state_cast_with_the_model(cls):
    "After `.double()` the kept state is cast, not dropped: the next batch continues from it."
    torch.manual_seed(0); xs = batches()
    m = cls(12, 5, nh=7).eval(); m(xs[0])
    ref = copy.deepcopy(m).double(); ref.h = each(ref.h, torch.Tensor.double)
    m.double()
    out = m(xs[1])
    assert out.dtype == torch.float64 and torch.equal(out, ref(xs[1]))
    m.float(); assert m(xs[2]).dtype == torch.float32

@pytest.mark.parametrize('cls', STATEFUL)
def test_training_after_inference_mode(cls):
    "A pass under `torch.inference_mode()`, then training: the kept state is used (same values), and backward works."
    torch.manual_seed(0); xs = batches()
    m = cls(12, 5, nh=7).eval()                         # no dropout: the same state gives the same output
    with torch.inference_mode(): m(xs[0])
    h = each(m.h, torch.Tensor.clone)                   # an ordinary copy of the state
    out = m(xs[1])
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.h = h
    assert torch.equal(out, m(xs[1]))

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('cls', STATEFUL)
def test_state_moved_to_the_cpu_with_the_model(cls):
    torch.manual_seed(0); xs = batches()
    m = cls(12, 5, nh=7).cuda().eval(); m(xs[0].cuda())
    h = each(m.h, torch.Tensor.cpu)
    m.cpu(); out = m(xs[1])
    m.h = h; assert torch.equal(out, m(xs[1]))

@pytest.mark.parametrize('cls', STATEFUL)
def test_state_saved_with_the_weights(cls):
    torch.manual_seed(0); xs = batches()
    m = cls(12, 5, nh=7); m(xs[0])
    m2 = cls(12, 5, nh=7); m2.load_state_dict(m.state_dict())
    assert same(m2.h, m.h)

# --- construction

@pytest.mark.parametrize('cell', [nn.LSTMCell, LstmCell])
def test_written_out_loop_refuses_lstm_cells(cell):
    with pytest.raises(TypeError, match=r'nn\.RNNCell, nn\.GRUCell, RnnCell or GruCell .*use CharSeqStatefulLSTM'): CharSeqStatefulRnn2(12, 5, nh=7, cell=cell)

@pytest.mark.parametrize('cell', [nn.RNNCell, nn.GRUCell, RnnCell, GruCell])
def test_written_out_loop_takes_one_tensor_cells(cell):
    assert CharSeqStatefulRnn2(12, 5, nh=7, cell=cell)(batches(1)[0]).shape == (24, 12)

@pytest.mark.parametrize('cls', STATEFUL)
def test_2018_positional_call_refused(cls):
    "The 2018 models' third argument was the batch size (`CharSeqStatefulGRU(md.nt, n_fac, 512)`): ours take the hidden size as a keyword."
    with pytest.raises(TypeError, match='positional'): cls(55, 42, 512)
    assert cls(55, 42, nh=256).nh == 256

# --- resuming

def lm_data(n=1200, bs=8, seed=0):
    ids = torch.randint(1, 12, (n,), generator=torch.Generator().manual_seed(seed))
    return DataBunch(LMLoader(ids, bs, 6, seed=seed), LMLoader(ids[:n // 2], bs, 6, rand_bptt=False))

def fit_run(cls, path, resume=False):
    "Three epochs without `ResetState`: each epoch's training starts from the state the previous validation pass left."
    torch.manual_seed(0)
    m = cls(12, 4, nh=8)
    fit_sgdr(Learner(m, optim.Adam(m.parameters(), 1e-2), seq_nll, lm_data()), 1e-2, 3, cbs=[Checkpoint(path, monitor=None, resume=resume)], silent=True)
    return m

@pytest.mark.parametrize('cls', [CharSeqStatefulGRU, CharSeqStatefulLSTM])
def test_resume_without_reset_state_matches_the_uninterrupted_run(cls, tmp_path):
    a = fit_run(cls, tmp_path/'a')
    b = fit_run(cls, tmp_path/'b', resume=tmp_path/'a'/'epoch_000.pth')
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)
    assert same(a.h, b.h)
