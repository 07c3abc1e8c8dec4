import math
import pytest, torch
from torch import nn
from torch.nn import init
from course_lib.init import gain, kaiming2, init_cnn


# gain
@pytest.mark.parametrize('a', [0, 0.01, 0.1, 0.5, 1, math.sqrt(5), 10, 1e6])
def test_gain_matches_torch(a):
    assert gain(a) == pytest.approx(init.calculate_gain('leaky_relu', a), rel=1e-12)

def test_gain_edges():
    assert gain(0) == math.sqrt(2)           # ReLU
    assert gain(1) == 1.0                    # identity
    assert gain(-0.3) == gain(0.3)           # only the slope's square matters
    assert gain(math.sqrt(5)) == pytest.approx(1 / math.sqrt(3))
    assert gain(1e6) < 2e-6                  # a huge slope needs a tiny gain
    assert gain(math.inf) == 0.0

def test_gain_rejects_non_numbers():
    with pytest.raises(TypeError): gain('0.1')


# kaiming2
@pytest.mark.parametrize('shape', [(5,), ()])
def test_kaiming2_too_few_dims_names_shape(shape):
    with pytest.raises(ValueError, match=r'shape \(nf, ni, \*kernel\), got shape ' + re_shape(shape)):
        kaiming2(torch.empty(shape), 0)

def re_shape(shape): return r'\(' + ', '.join(map(str, shape)) + (',' if len(shape) == 1 else '') + r'\)'

def test_kaiming2_not_a_tensor():
    with pytest.raises(ValueError, match='got shape .*list'): kaiming2([[1., 2.], [3., 4.]], 0)

@pytest.mark.parametrize('shape,fo', [((0, 3, 3, 3), True), ((4, 0), False), ((4, 3, 0, 3), False)])
def test_kaiming2_zero_fan(shape, fo):
    with pytest.raises(ValueError, match='zero fan'): kaiming2(torch.empty(shape), 0, use_fan_out=fo)

def test_kaiming2_zero_fan_in_but_fan_out_ok():
    w = kaiming2(torch.empty(4, 3, 2), 0, use_fan_out=True)   # fan_out = 4*2
    assert w.abs().max() <= math.sqrt(3) * gain(0) / math.sqrt(8) * (1 + 1e-6)

def test_kaiming2_in_place_on_parameter_keeps_grad_flag():
    p = nn.Conv2d(3, 4, 3).weight
    before = p.detach().clone()
    out = kaiming2(p, 0)
    assert out is p and p.requires_grad and not torch.equal(before, p.detach())
    assert p.abs().max() <= math.sqrt(3) * gain(0) / math.sqrt(27) * (1 + 1e-6)

@pytest.mark.parametrize('shape', [(6, 4), (6, 4, 3), (6, 4, 3, 3), (6, 4, 2, 3, 3)])
@pytest.mark.parametrize('fo', [False, True])
def test_kaiming2_same_numbers_as_torch(shape, fo):
    w1, w2 = torch.empty(shape), torch.empty(shape)
    torch.manual_seed(123); init.kaiming_uniform_(w1, a=0.1, mode='fan_out' if fo else 'fan_in')
    torch.manual_seed(123); kaiming2(w2, 0.1, use_fan_out=fo)
    torch.testing.assert_close(w1, w2)


# init_cnn
def nested():
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.emb, self.head = nested(), nn.Embedding(5, 3), nn.Linear(10, 2)
    def forward(self, x): return self.head(self.body(x))

@pytest.mark.parametrize('uniform', [False, True])
def test_init_cnn_nested(uniform):
    m = Custom()
    with torch.no_grad():
        for bn in (m.body[0][1], m.body[1][0][1]):   # give batch norm non-default state to check it is kept
            bn.weight.uniform_(); bn.bias.uniform_(); bn.running_mean.uniform_()
    convs = [l for l in m.modules() if isinstance(l, (nn.Conv2d, nn.Linear))]
    w_before = [l.weight.detach().clone() for l in convs]
    keep = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(('body.0.1', 'body.1.0.1', 'emb'))}
    assert init_cnn(m, uniform=uniform, linear=True) is m
    for l, w in zip(convs, w_before):
        assert not torch.equal(l.weight.detach(), w)
        if l.bias is not None: assert torch.count_nonzero(l.bias) == 0
    state = m.state_dict()
    for k, v in keep.items(): assert torch.equal(state[k], v), k
    assert len(convs) == 4 and m.body[1][0][0].bias is None

def test_init_cnn_scale():
    l = nn.Linear(2000, 1000)
    init_cnn(l, a=0., linear=True)
    assert l.weight.std().item() == pytest.approx(gain(0) / math.sqrt(2000), rel=0.02)
    init_cnn(l, uniform=True, a=math.sqrt(5), linear=True)
    assert l.weight.abs().max().item() <= 1 / math.sqrt(2000) * (1 + 1e-6)

def test_init_cnn_leaves_other_modules_alone():
    m = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4), nn.ReLU())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    init_cnn(m)
    for k, v in m.state_dict().items(): assert torch.equal(v, before[k])

def test_init_cnn_bad_input():
    with pytest.raises(TypeError, match='nn.Module, got list'): init_cnn([nn.Linear(2, 2)])


# --- the course's defaults: slope 0.1, convolutions only; the old behaviour one argument away

def test_init_cnn_defaults_are_the_course_s():
    m = nn.Sequential(nn.Conv2d(1, 64, 5), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    lin_w, lin_b = m[3].weight.detach().clone(), m[3].bias.detach().clone()
    init_cnn(m)
    assert m[0].weight.std().item() == pytest.approx(gain(0.1) / math.sqrt(25), rel=0.1) and not m[0].bias.any()
    assert torch.equal(m[3].weight, lin_w) and torch.equal(m[3].bias, lin_b)  # the final linear layer keeps PyTorch's init
    torch.manual_seed(1); init_cnn(m, a=0., linear=True)
    assert not m[3].bias.any() and not torch.equal(m[3].weight, lin_w)
    w1 = m[0].weight.detach().clone()
    m2 = nn.Sequential(nn.Conv2d(1, 64, 5), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    torch.manual_seed(1); init.kaiming_normal_(m2[0].weight, a=0.); init.kaiming_normal_(m2[3].weight, a=0.)
    assert torch.equal(w1, m2[0].weight) and torch.equal(m[3].weight, m2[3].weight)  # exactly the old init_cnn(m)

def test_mse_squeezes_the_output():
    from course_lib.init import mse
    out, targ = torch.randn(6, 1), torch.randn(6)
    assert mse(out, targ).item() == pytest.approx(((out[:, 0] - targ) ** 2).mean().item())
    assert mse(out[:, 0], targ) == mse(out, targ)
