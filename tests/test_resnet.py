import pytest, torch
from torch import nn
import torch.nn.functional as F
from course_lib.resnet import *

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
        torch.testing.assert_close(ours.vars.flatten(), bn.running_var, atol=1e-12, rtol=0)
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
    means, vars = torch.full((3, 1, 1), 2., dtype=f64), torch.full((3, 1, 1), 4., dtype=f64)
    m, a = torch.ones(3, 1, 1, dtype=f64), torch.zeros(3, 1, 1, dtype=f64)
    out = batch_norm(x, means, vars, m, a, training=False, eps=0.)
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


def n_params(m): return [p.numel() for p in m.parameters()]

def test_lesson_parameter_counts():
    assert n_params(SimpleNet([32*32*3, 40, 10])) == [122_880, 40, 400, 10]
    assert n_params(ConvNet([3, 20, 40, 80], 10)) == [540, 20, 7_200, 40, 28_800, 80, 800, 10]
    assert sum(n_params(ConvNet2([3, 20, 40, 80], 10))) == 37_490
    assert sum(n_params(ConvBnNet([10, 20, 40, 80, 160], 10))) == 155_970
    assert sum(n_params(ConvBnNet2([10, 20, 40, 80, 160], 10))) == 462_570
    assert sum(n_params(Resnet([10, 20, 40, 80, 160], 10))) == 769_170
    assert sum(n_params(Resnet2([16, 32, 64, 128, 256], 10, 0.2))) == 1_966_234

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

def test_resnet2_stem_trims_to_28_and_dropout_only_in_training():
    m = Resnet2([16, 32, 64, 128, 256], 10, p=0.5)
    assert m.conv1(torch.randn(2, 3, 32, 32)).shape == (2, 16, 28, 28)
    m.eval(); x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))
