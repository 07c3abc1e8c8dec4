"Lesson 6a's behaviours the lesson relies on, pinned down: the vocabulary a model keeps, sampling in eval mode from a zero state, the lesson's LSTM dropout, and the window models' formulas."
import io, math
import pytest, torch
from torch import nn
import torch.nn.functional as F
from course_lib.core import test_near
from course_lib.text import Vocab
from course_lib.rnn import *

STATEFUL = [CharSeqStatefulRnn, CharSeqStatefulRnn2, CharSeqStatefulGRU, CharSeqStatefulLSTM]

def batches(n=3, bs=4, sl=6, vs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vs, (bs, sl), generator=g) for _ in range(n)]

def roundtrip(sd):
    "A state dict through a file, read back as checkpoints are (`weights_only=True`)."
    f = io.BytesIO(); torch.save(sd, f); f.seek(0)
    return torch.load(f, weights_only=True)

# --- the vocabulary travels with the weights

@pytest.mark.parametrize('cls', STATEFUL)
def test_model_keeps_its_vocabulary_in_the_state_dict(cls):
    v = Vocab('abcd ')
    m = cls(v, 3, nh=6)
    assert (m.vocab_sz, m.itos) == (len(v), v.itos)
    m(batches(1, vs=len(v))[0])
    m2 = cls(len(v), 3, nh=6)
    assert m2.itos is None
    m2.load_state_dict(roundtrip(m.state_dict()))
    assert m2.itos == v.itos

def test_sampling_refuses_another_vocabulary_of_the_same_size():
    "Same size, other characters: refused, naming both; the same characters in another `Vocab` object are accepted."
    v, other = Vocab('abcd'), Vocab('abce')
    assert len(v) == len(other)
    m = CharSeqStatefulGRU(v, 3, nh=8)
    with pytest.raises(ValueError, match=r"trained with Vocab\(5: 'abcd'\), not Vocab\(5: 'abce'\) \(they differ from index 4\)"):
        get_next_n(m, other, 'ab', 5)
    with pytest.raises(ValueError, match=r"Vocab\(5: 'abcd'\), not Vocab\(6: 'abcde'\)"): get_next(m, Vocab('abcde'), 'ab')
    assert len(get_next_n(m, Vocab('dcba'), 'ab', 5)) == 7

def test_the_vocabulary_comes_with_loaded_weights():
    "Weights trained with one vocabulary loaded into a model built with another: the weights' vocabulary wins."
    v, other = Vocab('abcd'), Vocab('abce')
    trained, m = CharSeqStatefulLSTM(v, 3, nh=8), CharSeqStatefulLSTM(other, 3, nh=8)
    m.load_state_dict(roundtrip(trained.state_dict()))
    with pytest.raises(ValueError, match="trained with Vocab"): get_next_n(m, other, 'ab', 3)
    assert get_next_n(m, v, 'ab', 3, generator=torch.Generator().manual_seed(0)) == \
           get_next_n(trained, v, 'ab', 3, generator=torch.Generator().manual_seed(0))

def test_weights_saved_without_a_vocabulary_load():
    "A state dict from before models kept their vocabulary (extra state without `itos`) loads; only the size is checked then."
    v = Vocab('abcd')
    m = CharSeqStatefulGRU(v, 3, nh=8)
    sd = m.state_dict(); sd['_extra_state'] = {'h': None}
    m.load_state_dict(sd)
    assert m.itos is None and len(get_next_n(m, Vocab('abce'), 'ab', 2)) == 4

# --- sampling: eval mode, a zero state, the prompt read once

def lstm_with_dropout(v, seed=0):
    torch.manual_seed(seed)
    return CharSeqStatefulLSTM(v, 3, nh=16, p=0.5, p_out=0.5)

def test_sampling_with_dropout_off():
    "Dropout draws from the global generator: with dropout acting, other global seeds would give other samples."
    v = Vocab('abcdefgh ')
    m = lstm_with_dropout(v)
    torch.manual_seed(1); a = get_next_n(m, v, 'abc', 60, 1., torch.Generator().manual_seed(0))
    torch.manual_seed(2); b = get_next_n(m, v, 'abc', 60, 1., torch.Generator().manual_seed(0))
    assert a == b
    torch.manual_seed(1); p1 = m(v.numericalize('abc')[None]); m.reset()
    torch.manual_seed(2); p2 = m(v.numericalize('abc')[None]); m.reset()
    assert not torch.allclose(p1, p2)                                   # the same model in training mode: dropout acts

def test_sampling_puts_every_mode_back():
    v = Vocab('abcd ')
    m = lstm_with_dropout(v)
    m.train(); m.drop.eval()                                            # a mixed state: the model training, one module not
    get_next_n(m, v, 'ab', 5)
    assert m.training and m.rnn.training and not m.drop.training and m.h is None
    m.eval(); get_next_n(m, v, 'ab', 5)
    assert not m.training and not m.rnn.training

def greedy_by_hand(m, v, text, n):
    "The most likely character (never index 0) after `text`, fed back, `n` times: the eval-mode model from a zero state."
    m.eval(); m.reset()
    out, xb = text, v.numericalize(text)[None]
    with torch.no_grad():
        for _ in range(n):
            logp = m(xb)[-1]
            i = int(logp[1:].argmax()) + 1
            out += v.itos[i]; xb = torch.tensor([[i]])
    m.reset()
    return out

@pytest.mark.parametrize('cls', STATEFUL)
def test_greedy_sampling_is_the_models_argmax(cls):
    "The prompt read once from zeros, then one character at a time with the state carried: the greedy text by hand."
    v = Vocab('abcdefgh ')
    torch.manual_seed(0)
    m = cls(v, 4, nh=12)
    with torch.no_grad(): m.l_out.bias[0] = 5.                          # index 0 the most likely: never drawn
    want = greedy_by_hand(m, v, 'abca', 25)
    m.train()
    assert get_next_n(m, v, 'abca', 25, 1e-40) == want

@pytest.mark.parametrize('cls', STATEFUL)
def test_sampling_starts_from_a_zero_state(cls):
    "A state left by a one-row batch (the size sampling uses) is not where sampling starts."
    v = Vocab('abcdefgh ')
    torch.manual_seed(0)
    m = cls(v, 4, nh=12).eval()
    fresh = get_next_n(m, v, 'ab', 30, 1e-40)
    m(v.numericalize('hhhhhhgg gg')[None])                              # a kept state with one row
    assert m.h is not None and get_next_n(m, v, 'ab', 30, 1e-40) == fresh

def test_sampling_draws_from_the_given_generator():
    v = Vocab('abcdefgh ')
    m = lstm_with_dropout(v)
    a, b = (get_next_n(m, v, 'a', 80, 1., torch.Generator().manual_seed(s)) for s in (0, 1))
    assert a != b and a == get_next_n(m, v, 'a', 80, 1., torch.Generator().manual_seed(0))

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (or the CUDA stand-in)')
def test_sampling_refuses_a_generator_of_another_device():
    v = Vocab('abcd ')
    m = CharSeqStatefulGRU(v, 3, nh=8)
    with pytest.raises(ValueError, match=r"the generator is on cuda(:0)?, the model on cpu: draw with a torch.Generator\('cpu'\)"):
        get_next_n(m, v, 'ab', 3, generator=torch.Generator('cuda'))
    m.cuda()
    with pytest.raises(ValueError, match=r"the generator is on cpu, the model on cuda(:0)?"): get_next_n(m, v, 'ab', 3, generator=torch.Generator())
    s = get_next_n(m, v, 'ab', 10, generator=torch.Generator('cuda').manual_seed(0))
    assert len(s) == 12 and set(s) <= set('abcd ')

# --- the lesson's LSTM

def test_lstm_defaults_are_the_lessons():
    "Two layers, dropout 0.5 between them, none on the output: `nn.LSTM(n_fac, n_hidden, 2, dropout=0.5)`."
    m = CharSeqStatefulLSTM(12, 5, nh=8)
    assert (m.nl, m.rnn.num_layers, m.rnn.dropout, m.drop.p) == (2, 2, 0.5, 0.)
    xb = batches(1, vs=12)[0]
    torch.manual_seed(0); a = m(xb); m.reset()
    torch.manual_seed(1); b = m(xb); m.reset()
    assert not torch.allclose(a, b)                                     # training: the dropout between the layers acts
    m.eval()
    assert torch.equal(m(xb), (m.reset(), m(xb))[1])                    # evaluating: none
    m.train(); m.rnn.dropout = 0.; m.reset()
    torch.manual_seed(0); a = m(xb); m.reset()
    torch.manual_seed(1); assert torch.equal(a, m(xb))                  # it was the only randomness

# --- the stateful models from a zero state, the state fitted to the weights

@pytest.mark.parametrize('cls', STATEFUL)
def test_first_batch_starts_from_zeros(cls):
    torch.manual_seed(0)
    m = cls(12, 5, nh=7).eval()
    xb = batches(1, vs=12)[0]
    out = m(xb)
    ref = cls(12, 5, nh=7).eval(); ref.load_state_dict(m.state_dict())
    ref.h = ref.init_hidden(len(xb))
    assert all(torch.equal(h, torch.zeros_like(h)) for h in (ref.h if isinstance(ref.h, tuple) else (ref.h,)))
    assert torch.equal(ref(xb), out)

def test_state_like():
    w = torch.zeros(3, dtype=torch.float64)
    h = (torch.ones(2, 3), torch.ones(2, 3))
    out = state_like(h, w)
    assert isinstance(out, tuple) and all(o.dtype == torch.float64 and torch.equal(o, torch.ones(2, 3, dtype=torch.float64)) for o in out)
    t = torch.ones(2)
    assert state_like(t, torch.zeros(1)) is t                            # already fitting: the same tensor
    with torch.inference_mode(): made = torch.ones(2)
    kept = state_like(made, torch.zeros(1))
    assert not kept.is_inference() and torch.equal(kept, made)
    with torch.inference_mode(): assert state_like(made, torch.zeros(1)) is made

def test_written_out_loop_takes_a_relu_cell_and_names_a_partial():
    from functools import partial
    m = CharSeqStatefulRnn2(12, 5, nh=7, cell=partial(nn.RNNCell, nonlinearity='relu'))
    assert m.rnn.nonlinearity == 'relu' and m(batches(1, vs=12)[0]).shape == (24, 12)
    assert not hasattr(CharSeqStatefulRnn2(12, 5, nh=7), 'cell')          # the cell is the `rnn` module, nothing kept beside it
    with pytest.raises(TypeError, match=r'cell=LSTMCell (raised|returned)'): CharSeqStatefulRnn2(12, 5, nh=7, cell=partial(nn.LSTMCell))

# --- the window models compute the lesson's formulas

def test_char3model_add_and_concat():
    torch.manual_seed(0)
    xb = torch.randint(0, 12, (5, 3))
    m, c = Char3Model(12, 4, 6), Char3Model(12, 4, 6, concat=True)
    h = hc = torch.zeros(5, 6)
    for ch in xb.unbind(1):
        h = torch.tanh(m.l_hidden(h + F.relu(m.l_in(m.e(ch)))))
        hc = torch.tanh(c.l_hidden(F.relu(c.l_in(torch.cat([hc, c.e(ch)], 1)))))
    test_near(m(xb), F.log_softmax(m.l_out(h), -1), 1e-6)
    test_near(c(xb), F.log_softmax(c.l_out(hc), -1), 1e-6)
    assert c.l_in.in_features == 4 + 6 and m.l_in.in_features == 4

def test_loop_and_rnn_models():
    torch.manual_seed(0)
    xb = torch.randint(0, 12, (5, 7))
    loop = CharLoopModel(12, 4, 6)
    h = torch.zeros(5, 6)
    for ch in xb.unbind(1): h = loop.step(h, ch)
    test_near(loop(xb), F.log_softmax(loop.l_out(h), -1), 1e-6)
    r, s = CharRnn(12, 4, 6), CharSeqRnn(12, 4, 6)
    s.load_state_dict(r.state_dict())
    outp = r.rnn(r.e(xb))[0]
    test_near(r(xb), F.log_softmax(r.l_out(outp[:, -1]), -1), 1e-6)
    test_near(s(xb), F.log_softmax(r.l_out(outp), -1).view(-1, 12), 1e-6)
    test_near(s(xb).view(5, 7, 12)[:, -1], r(xb), 1e-6)                  # the last step's prediction is CharRnn's

def test_seq_nll_flattens_the_targets():
    torch.manual_seed(0)
    pred, yb = torch.randn(12, 5).log_softmax(-1), torch.randint(0, 5, (3, 4))
    test_near(seq_nll(pred, yb), -pred[torch.arange(12), yb.reshape(-1)].mean(), 1e-7)

@pytest.mark.parametrize('bad', [0, 2.5, True, 'abc', [1, 2]])
def test_vocabulary_argument_checked(bad):
    with pytest.raises(ValueError, match=r'vocab=.*expected a Vocab or its size'): CharSeqStatefulGRU(bad, 3, nh=4)
