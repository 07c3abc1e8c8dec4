import pytest, torch
from torch import nn
import torch.nn.functional as F
from course_lib.resnet import *
from course_lib.summary import n_params

f64 = torch.float64

def reference(layer):
    "conv → ReLU → nn.BatchNorm2d (or conv → BN → ReLU) in float64, with `layer`'s conv weights, `m` and `a`."
    c = layer.conv
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False, dtype=f64)
    bn = nn.BatchNorm2d(c.out_channels, momentum=layer.mom, eps=layer.eps, dtype=f64)
    with torch.no_grad():
        conv.weight.copy_(c.weight); bn.weight.copy_(layer.m.flatten()); bn.bias.copy_(layer.a.flatten())
    return nn.Sequential(conv, nn.ReLU(), bn) if layer.bn == 'after' else nn.Sequential(conv, bn, nn.ReLU())

def batches(n=5, seed=0, shape=(6, 3, 9, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=f64, generator=g) * 3 + 2 for _ in range(n)]

@pytest.mark.parametrize('order', ['after', 'before'])
@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('stride,ks', [(2, 3), (1, 3), (1, 7)])
def test_bnlayer_matches_batchnorm2d_in_training_and_eval(order, fused, stride, ks):
    torch.manual_seed(0)
    ours = BnLayer(3, 5, stride=stride, kernel_size=ks, bn=order, fused=fused).double()
    with torch.no_grad(): ours.m.uniform_(0.5, 2.); ours.a.uniform_(-1., 1.)
    ref = reference(ours)
    bn = ref[2] if order == 'after' else ref[1]
    xs = batches()
    for x in xs[:4]:
        torch.testing.assert_close(ours(x), ref(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(ours.means.flatten(), bn.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(ours.variances.flatten(), bn.running_var, atol=1e-12, rtol=0)
    ours.eval(); ref.eval()
    torch.testing.assert_close(ours(xs[4]), ref(xs[4]), atol=1e-12, rtol=0)
    ref.train()
    torch.testing.assert_close(ours(xs[4]), ref.eval()(xs[4]), atol=1e-12, rtol=0)  # eval does not move the statistics

@pytest.mark.parametrize('fused', [False, True])
def test_bnlayer_gradients_match_batchnorm2d(fused):
    torch.manual_seed(1)
    ours = BnLayer(3, 4, fused=fused).double()
    with torch.no_grad(): ours.m.uniform_(0.5, 2.); ours.a.uniform_(-1., 1.)
    ref = reference(ours)
    x = batches(1)[0]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(x1) ** 3).mean().backward(); (ref(x2) ** 3).mean().backward()
    for a, b in [(ours.conv.weight.grad, ref[0].weight.grad), (ours.m.grad.flatten(), ref[2].weight.grad),
                 (ours.a.grad.flatten(), ref[2].bias.grad), (x1.grad, x2.grad)]:
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

def test_batch_norm_function_uses_running_stats_in_eval():
    x = batches(1)[0]
    means, variances = torch.full((3, 1, 1), 2., dtype=f64), torch.full((3, 1, 1), 4., dtype=f64)
    m, a = torch.ones(3, 1, 1, dtype=f64), torch.zeros(3, 1, 1, dtype=f64)
    out = batch_norm(x, means, variances, m, a, training=False, eps=0.)
    torch.testing.assert_close(out, (x - 2) / 2)
    assert torch.equal(means, torch.full((3, 1, 1), 2., dtype=f64))

def test_bnlayer_without_bn_is_conv_with_bias_and_relu():
    l = BnLayer(3, 4, bn=None)
    assert l.conv.bias is not None and not hasattr(l, 'm') and not list(l.buffers())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(l(x), F.relu(l.conv(x)))

def test_bnlayer_bad_bn():
    with pytest.raises(ValueError, match="bn='middle', expected 'after'"): BnLayer(3, 4, bn='middle')

def test_resnet_layer_adds_its_input():
    l = ResnetLayer(4, 4, stride=1)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(l(x), x + BnLayer.forward(l, x))


def sizes(m): return [p.numel() for p in m.parameters()]

def test_lesson_parameter_counts():
    assert sizes(SimpleNet([32*32*3, 40, 10])) == [122_880, 40, 400, 10]
    assert sizes(ConvNet([3, 20, 40, 80], 10)) == [540, 20, 7_200, 40, 28_800, 80, 800, 10]
    assert n_params(ConvNet2([3, 20, 40, 80], 10)) == 37_490
    assert n_params(ConvBnNet([10, 20, 40, 80, 160], 10)) == 155_970
    assert n_params(ConvBnNet2([10, 20, 40, 80, 160], 10)) == 462_570
    assert n_params(Resnet([10, 20, 40, 80, 160], 10)) == 769_170
    assert n_params(Resnet2([16, 32, 64, 128, 256], 10, 0.2)) == 1_966_234

@pytest.mark.parametrize('model,shape', [(SimpleNet([32*32*3, 40, 10]), (4, 10)), (ConvNet([3, 20, 40, 80], 10), (4, 10)),
                                         (ConvNet2([3, 20, 40, 80], 10), (4, 10)), (ConvBnNet([10, 20, 40, 80, 160], 10), (4, 10)),
                                         (ConvBnNet2([10, 20, 40, 80, 160], 10), (4, 10)), (Resnet([10, 20, 40, 80, 160], 10), (4, 10)),
                                         (Resnet2([16, 32, 64, 128, 256], 10, 0.2), (4, 10)), (Resnet([4, 8, 16], 3, res=False, bn='before'), (4, 3))])
def test_models_output_log_probabilities(model, shape):
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == shape
    torch.testing.assert_close(out.exp().sum(1), torch.ones(shape[0]))

def test_plain_variant_has_no_residual_layers():
    assert not any(isinstance(m, ResnetLayer) for m in Resnet2([4, 8, 16], 10, res=False).modules())
    assert sum(isinstance(m, ResnetLayer) for m in Resnet2([4, 8, 16], 10).modules()) == 4
    assert all(m.bn is None for m in Resnet([4, 8], 10, bn=None).modules() if isinstance(m, BnLayer))

def test_resnet2_stem_trims_to_28():
    m = Resnet2([16, 32, 64, 128, 256], 10, p=0.5)
    assert m.conv1(torch.randn(2, 3, 32, 32)).shape == (2, 16, 28, 28)

def features_into_out(m, x):
    "The input of `m.out` (the pooled features after dropout) on batch `x`."
    seen = []
    h = m.out.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try: m(x)
    finally: h.remove()
    return seen[0]

def test_resnet2_applies_dropout_in_training_only():
    torch.manual_seed(0)
    m, x = Resnet2([8, 16, 32], 10, p=0.5), torch.randn(64, 3, 32, 32)
    f = features_into_out(m.train(), x)
    share = (f == 0).float().mean().item()  # max-pooled batch-norm outputs are never exactly 0 unless dropped
    assert 0.4 < share < 0.6, f'{share:.3f} of the features dropped in training with p=0.5'
    torch.manual_seed(1); a = m(x)
    torch.manual_seed(2); b = m(x)
    assert not torch.allclose(a, b)  # batch norm in training depends on the batch only: the masks differ
    m.eval()
    assert (features_into_out(m, x) != 0).all()
    torch.testing.assert_close(m(x), m(x))

def test_resnet2_without_dropout_is_deterministic_in_training():
    torch.manual_seed(0)
    m, x = Resnet2([8, 16, 32], 10, p=0.).train(), torch.randn(16, 3, 32, 32)
    torch.manual_seed(1); a = m(x)
    torch.manual_seed(2); b = m(x)
    torch.testing.assert_close(a, b)
    assert (features_into_out(m, x) != 0).all()


def layer_shapes(model, x):
    "Output shapes (c, h, w) of `conv1` and of every `BnLayer`/`ResnetLayer` of `model`, in the order they run."
    shapes, hs = [], []
    for mod in model.modules():
        if isinstance(mod, BnLayer) or mod is getattr(model, 'conv1', None):
            hs.append(mod.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape[1:]))))
    try: model(x)
    finally:
        for h in hs: h.remove()
    return shapes

def stages(cs, s0=32, reps=1):
    "Shapes of a stack of stride-2 layers through channels `cs`, each followed by `reps - 1` stride-1 layers."
    return [(c, s0 // 2 ** (i + 1), s0 // 2 ** (i + 1)) for i, c in enumerate(cs) for _ in range(reps)]

@pytest.mark.parametrize('model,expected', [
    (ConvBnNet([10, 20, 40, 80, 160], 10), [(10, 32, 32)] + stages([20, 40, 80, 160])),
    (ConvBnNet2([10, 20, 40, 80, 160], 10), [(10, 32, 32)] + stages([20, 40, 80, 160], reps=2)),  # the extra layers keep the grid
    (Resnet([10, 20, 40, 80, 160], 10), [(10, 32, 32)] + stages([20, 40, 80, 160], reps=3)),
    (Resnet([10, 20, 40, 80, 160], 10, res=False, bn=None), [(10, 32, 32)] + stages([20, 40, 80, 160], reps=3)),
    (Resnet2([16, 32, 64, 128, 256], 10, 0.2), [(16, 28, 28)] + [(c, s, s) for c, s in ((32, 14), (64, 7), (128, 4), (256, 2)) for _ in range(3)])])
def test_shapes_layer_by_layer(model, expected):
    "Every layer's output, not just the model's: the pooling head hides a grid that shrinks too fast."
    assert layer_shapes(model, torch.randn(2, 3, 32, 32)) == expected

def test_convbnnet2_extra_layers_are_stride_1():
    m = ConvBnNet2([10, 20, 40, 80, 160], 10)
    assert [l.conv.stride for l in m.layers] == [(2, 2)] * 4 and [l.conv.stride for l in m.layers2] == [(1, 1)] * 4
    assert sum(isinstance(o, (nn.Conv2d, nn.Linear)) for o in m.modules()) == 10  # the lesson's "12 layers": conv1, 8 BnLayers, out


@pytest.mark.parametrize('fused', [False, True])
def test_bnlayer_one_value_per_channel_in_training_is_refused(fused):
    "n = 1 value per channel: no variance to estimate (n-1 = 0). PyTorch refuses it in training; so do we, without touching the running statistics."
    l = BnLayer(3, 4, fused=fused)
    x = torch.randn(1, 3, 1, 1)  # a 3x3 stride-2 conv with padding 1 keeps 1x1
    with pytest.raises(ValueError, match='more than 1 value per channel'): l(x)
    assert torch.equal(l.variances, torch.ones(4, 1, 1)) and torch.equal(l.means, torch.zeros(4, 1, 1))
    l.eval()
    assert torch.isfinite(l(x)).all()
    l.train(); l(torch.randn(2, 3, 1, 1))  # two values per channel: fine
    assert torch.isfinite(l.variances).all()

def test_batch_norm_function_refuses_one_value_per_channel_in_training():
    x = torch.randn(1, 3, 1, 1, dtype=f64)
    means, variances = torch.zeros(3, 1, 1, dtype=f64), torch.ones(3, 1, 1, dtype=f64)
    m, a = torch.ones(3, 1, 1, dtype=f64), torch.zeros(3, 1, 1, dtype=f64)
    with pytest.raises(ValueError, match=r'x has shape \(1, 3, 1, 1\): 1 value per channel, expected more than 1 value per channel in training'):
        batch_norm(x, means, variances, m, a, training=True)
    assert torch.equal(variances, torch.ones(3, 1, 1, dtype=f64))
    torch.testing.assert_close(batch_norm(x, means, variances, m, a, training=False, eps=0.), x)


# Behaviour the lesson relies on, each written from the lesson's description rather than from the code.

@pytest.mark.parametrize('fused', [False, True])
def test_bnlayer_default_running_statistics_move_a_tenth_and_eps_is_1e_5(fused):
    "nn.BatchNorm2d's defaults, from the formula (the reference above takes mom and eps from the layer itself)."
    torch.manual_seed(0)
    l = BnLayer(3, 4, fused=fused).double()
    x = batches(1)[0]
    with torch.no_grad(): h = F.relu(l.conv(x))
    l(x)
    n = h.numel() // h.shape[1]
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), correction=0)
    torch.testing.assert_close(l.means.flatten(), 0.1 * mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(l.variances.flatten(), 0.9 + 0.1 * var * n / (n - 1), atol=1e-12, rtol=0)
    l.eval()
    want = (h - l.means) / (l.variances + 1e-5).sqrt()
    torch.testing.assert_close(l(x), want, atol=1e-12, rtol=0)

@pytest.mark.parametrize('fused', [False, True])
def test_bnlayer_after_normalises_last_and_before_ends_in_relu(fused):
    torch.manual_seed(0)
    x = batches(1)[0]
    after, before = BnLayer(3, 5, fused=fused).double(), BnLayer(3, 5, bn='before', fused=fused).double()
    with torch.no_grad():
        for l in (after, before): l.m.fill_(2.); l.a.fill_(-3.)
    y = after(x)  # conv, ReLU, then the norm: each channel has mean a and (biased) std m
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.full((5,), -3., dtype=f64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), correction=0).sqrt(), torch.full((5,), 2., dtype=f64), atol=1e-4, rtol=0)
    y = before(x)  # conv, norm, then ReLU: nothing negative, and the shift a=-3 zeroes most of it
    assert (y >= 0).all() and 0.5 < (y == 0).double().mean() < 1
    assert f"bn='after', mom=0.1, eps=1e-05, fused={fused}" in repr(after) and "bn=None\n" in repr(BnLayer(3, 5, bn=None))

def test_convlayer_is_a_padded_stride_2_conv_then_relu():
    l = ConvLayer(3, 6)
    assert l.conv.stride == (2, 2) and l.conv.padding == (1, 1) and l.conv.kernel_size == (3, 3)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(l(x), F.relu(l.conv(x)))
    assert l(x).shape == (2, 6, 5, 5)

def test_simplenet_has_no_relu_on_its_last_layer():
    torch.manual_seed(0)
    m, x = SimpleNet([12, 7, 5]), torch.randn(4, 3, 2, 2)
    h = F.relu(m.layers[0](x.flatten(1)))
    torch.testing.assert_close(m(x), F.log_softmax(m.layers[1](h), dim=-1))

def test_convnet_is_unpadded_and_max_pools():
    torch.manual_seed(0)
    m, x = ConvNet([3, 4, 6], 5), torch.randn(2, 3, 16, 16)
    assert [l.padding for l in m.layers] == [(0, 0)] * 2 and [l.stride for l in m.layers] == [(2, 2)] * 2
    h = F.relu(m.layers[1](F.relu(m.layers[0](x))))
    assert h.shape[-2:] == (3, 3)  # 16 -> 7 -> 3
    torch.testing.assert_close(m(x), F.log_softmax(m.out(h.amax((2, 3))), dim=-1))

def test_pool_head_max_pools_then_drops_then_classifies():
    torch.manual_seed(0)
    x, out = torch.randn(3, 4, 5, 5), nn.Linear(4, 2)
    torch.testing.assert_close(pool_head(x, out), F.log_softmax(out(x.amax((2, 3))), dim=-1))
    drop = nn.Dropout(1.).train()  # everything dropped: only the bias is left
    torch.testing.assert_close(pool_head(x, out, drop), F.log_softmax(out.bias.expand(3, 2), dim=-1))

def manual_forward(m, x):
    "The lesson's forward, written out: stem, then per stage the stride-2 layer and its two residual (or plain) layers."
    x = m.conv1(x)
    for l, l2, l3 in zip(m.layers, m.layers2, m.layers3):
        x = l(x)
        x = x + BnLayer.forward(l2, x) if isinstance(l2, ResnetLayer) else l2(x)
        x = x + BnLayer.forward(l3, x) if isinstance(l3, ResnetLayer) else l3(x)
    return F.log_softmax(m.out(x.amax((2, 3))), dim=-1)

@pytest.mark.parametrize('cls', [Resnet, Resnet2])
@pytest.mark.parametrize('res', [True, False])
def test_resnets_run_each_stage_in_the_lesson_order(cls, res):
    torch.manual_seed(0)
    m = cls([4, 8, 16], 10, res=res).eval()  # eval: running statistics, no dropout; the same numbers both ways
    for l in m.modules():
        if isinstance(l, BnLayer) and l.bn:
            with torch.no_grad(): l.means.uniform_(-0.5, 0.5); l.variances.uniform_(0.5, 2.)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), manual_forward(m, x))
    mids = list(m.layers2) + list(m.layers3)
    assert all(isinstance(l, ResnetLayer) == res for l in mids) and len(mids) == 4
    assert all(l.conv.stride == (1, 1) for l in mids) and all(l.conv.stride == (2, 2) for l in m.layers)

@pytest.mark.parametrize('cls', [ConvBnNet, ConvBnNet2, Resnet, Resnet2])
def test_batch_norm_options_reach_every_bnlayer(cls):
    m = cls([4, 8, 16], 10, bn='before', mom=0.3, eps=1e-3, fused=False)
    bns = [l for l in m.modules() if isinstance(l, BnLayer)]
    assert bns and all((l.bn, l.mom, l.eps, l.fused) == ('before', 0.3, 1e-3, False) for l in bns)
    assert all(not isinstance(l, BnLayer) or l.bn is None for l in cls([4, 8], 10, bn=None).modules())

def test_resnet2_stem_is_a_7x7_stride_1_bnlayer_and_keeps_p():
    m = Resnet2([16, 32, 64], 10, p=0.3)
    assert isinstance(m.conv1, BnLayer) and m.conv1.conv.kernel_size == (7, 7) and m.conv1.conv.stride == (1, 1)
    assert m.drop.p == 0.3 and Resnet2([16, 32], 10).drop.p == 0.5  # the lesson's default
    assert isinstance(Resnet([10, 20], 10).conv1, nn.Conv2d) and Resnet([10, 20], 10).conv1.kernel_size == (5, 5)

def test_resnet_layer_default_is_the_identity_plus_a_unit_scale_correction():
    "At the start f(x) = BN(ReLU(conv x)) has per-channel std 1: the correction is as large as a normalised input."
    torch.manual_seed(0)
    l = ResnetLayer(6, 6, stride=1)
    x = F.batch_norm(torch.randn(16, 6, 8, 8) * 3 + 1, None, None, training=True)  # a normalised input
    f = l(x) - x
    torch.testing.assert_close(f.norm() / x.norm(), torch.tensor(1.), atol=1e-3, rtol=0)
    with torch.no_grad(): l.m.zero_()
    assert torch.equal(l(x), x)
