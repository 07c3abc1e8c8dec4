"""The CUDA stand-in CI runs the course with (tools/standin): it fails where CUDA fails, and nowhere else.

Each test switches it on for its own block (`with standin():`), so the file means the same whether pytest runs with
`COURSE_STANDIN=cuda` or without it."""
import os, subprocess, sys, warnings
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
import torch.nn.functional as F

STANDIN = Path(__file__).resolve().parent.parent/'tools'/'standin'
sys.path.insert(0, str(STANDIN))
import cuda_standin as cs
from cuda_standin import standin

def raises(f, *texts):
    "The exception `f()` raises, checked to mention each of `texts`."
    with pytest.raises(Exception) as e: f()
    for t in texts: assert t in str(e.value), f'{t!r} not in {e.value!r}'
    return e.value

def test_a_device_tensor_is_marked_and_keeps_its_values():
    with standin():
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        x = torch.arange(6.).view(2, 3)
        d = x.to('cuda')
        assert d.device == torch.device('cuda', 0) and d.is_cuda and x.device.type == 'cpu'
        assert d is not x and (d * 2).device.type == 'cuda' and d.sum().device.type == 'cuda'
        assert torch.equal(d.cpu(), x) and d.cpu().device.type == 'cpu'
        assert torch.zeros(3, device='cuda').device.type == 'cuda' and torch.zeros(3).device.type == 'cpu'
        assert "device='cuda:0'" in repr(d)

def test_mixing_devices_raises_as_cuda_does():
    with standin():
        x = torch.randn(4, 3); d = x.cuda()
        for f in (lambda: d + x, lambda: x * d, lambda: torch.cat([d, x]), lambda: torch.stack([d[0, 0], x[0, 0]]),
                  lambda: nn.Linear(3, 2)(d), lambda: F.cross_entropy(d, torch.zeros(4, dtype=torch.long)),
                  lambda: torch.equal(d, x)):
            raises(f, 'cuda:0')
        raises(lambda: x[torch.tensor([0, 1]).cuda()], 'indices should be either on cpu or on the same device')
        # what CUDA allows: host scalars, host indices into a device tensor, copies both ways, reading numbers back
        assert (d + torch.tensor(1.)).device.type == 'cuda' and (d + 1).device.type == 'cuda'
        assert d[torch.tensor([0, 2])].device.type == 'cuda'
        d.copy_(x); x.copy_(d); d[:2] = x[:2]
        assert isinstance(d.sum().item(), float) and len(d.tolist()) == 4 and float(d[0, 0]) == x[0, 0].item()

def test_device_tensors_do_not_turn_into_numpy():
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    from fastcore.test import test_eq, test_close
    with standin():
        d = torch.ones(3, 3).cuda()
        raises(lambda: d.numpy(), "can't convert cuda:0")
        raises(lambda: np.asarray(d), "can't convert cuda:0")
        raises(lambda: plt.imshow(d), "can't convert cuda:0")
        raises(lambda: test_eq(d, d), "can't convert cuda:0")
        raises(lambda: test_close(d, torch.ones(3, 3)), 'cuda:0')
        assert np.asarray(d.cpu()).shape == (3, 3) and d.numpy(force=True).shape == (3, 3)
        test_eq(d.cpu(), torch.ones(3, 3))
        plt.close('all')

def test_host_reads_of_device_tensors_are_counted():
    with standin():
        d, h = torch.ones(3).cuda(), torch.ones(3)
        cs.reset_syncs()
        d.sum().item(); d.tolist(); float(d[0]); bool(d[0] > 0); d.cpu()
        h.sum().item(); h.tolist()  # host tensors: no sync
        assert cs.syncs() == 5

def test_a_model_moves_in_place_and_trains_on_the_device():
    with standin():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        ref = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)); ref.load_state_dict(m.state_dict())
        opt, ropt = (torch.optim.SGD(o.parameters(), lr=0.1, momentum=0.9) for o in (m, ref))
        ps = list(m.parameters())
        m.to('cuda')
        assert all(p is q for p, q in zip(ps, m.parameters())) and all(p.device.type == 'cuda' for p in ps)
        raises(lambda: m(torch.randn(4, 3)), 'cuda:0 and cpu')
        x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        for model, o, xb, yb in ((m, opt, x.cuda(), y.cuda()), (ref, ropt, x, y)):
            for _ in range(3):
                F.cross_entropy(model(xb), yb).backward(); o.step(); o.zero_grad()
        assert all(p.grad is None or p.grad.device.type == 'cuda' for p in m.parameters())
        assert opt.state[ps[0]]['momentum_buffer'].device.type == 'cuda'
        for p, q in zip(m.parameters(), ref.parameters()): torch.testing.assert_close(p.cpu(), q)  # the same maths, the values kept
        m.cpu()
        assert all(p.device.type == 'cpu' for p in m.parameters()) and m(x).device.type == 'cpu'

def test_a_copy_of_a_device_model_stays_on_the_device():
    import copy
    with standin():
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).cuda()
        c = copy.deepcopy(m)
        assert all(t.device.type == 'cuda' for t in list(c.parameters()) + list(c.buffers()))
        assert c(torch.randn(5, 3).cuda()).device.type == 'cuda'

def test_generators_have_a_device():
    with standin():
        g, gc = torch.Generator('cuda').manual_seed(0), torch.Generator().manual_seed(0)
        assert isinstance(g, torch.Generator) and g.device.type == 'cuda' and gc.device.type == 'cpu'
        raises(lambda: torch.randint(0, 9, (3,), generator=gc, device='cuda'), "Expected a 'cuda' device type for generator but found 'cpu'")
        raises(lambda: torch.rand(3, generator=g), "Expected a 'cpu' device type for generator but found 'cuda'")
        raises(lambda: torch.multinomial(torch.ones(4).cuda(), 1, generator=gc), "found 'cpu'")
        a = torch.randint(0, 1000, (20,), generator=torch.Generator('cuda').manual_seed(5), device='cuda').cpu()
        b = torch.randint(0, 1000, (20,), generator=torch.Generator('cuda').manual_seed(5), device='cuda').cpu()
        c = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, c)  # a CUDA stream is not the CPU's, for the same seed
        raises(lambda: torch.Generator().set_state(g.get_state()), 'size')
        raises(lambda: torch.Generator('cuda').set_state(gc.get_state()), 'size')
        dl = torch.utils.data.DataLoader(range(10), batch_size=4, shuffle=True, generator=torch.Generator('cuda'))
        raises(lambda: list(dl), "found 'cuda'")

def test_the_device_has_its_own_default_generator():
    with standin():
        torch.manual_seed(0); a = torch.rand(5, device='cuda'); h = torch.rand(5)
        torch.manual_seed(0); b = torch.rand(5, device='cuda')
        assert torch.equal(a.cpu(), b.cpu()) and not torch.equal(a.cpu(), h)
        torch.manual_seed(0); c = torch.rand(5)
        assert torch.equal(c, h)  # drawing on the device left the CPU's stream alone
        s = torch.cuda.get_rng_state()
        d1 = F.dropout(torch.ones(50).cuda(), 0.5)
        torch.cuda.set_rng_state(s)
        assert torch.equal(F.dropout(torch.ones(50).cuda(), 0.5).cpu(), d1.cpu())
        assert len(torch.cuda.get_rng_state_all()) == 1

def test_cudnn_rnn_dropout_keeps_a_state_no_generator_holds():
    with standin():
        lstm = nn.LSTM(4, 8, 2, dropout=0.5).cuda()
        x = torch.randn(5, 3, 4).cuda()
        def out(): torch.manual_seed(0); return lstm(x)[0].detach().cpu()
        assert not torch.equal(out(), out())
        with torch.backends.cudnn.flags(enabled=False): assert torch.equal(out(), out())
        lstm.eval(); assert torch.equal(out(), out())

def test_gpu_kernels_are_not_bit_exact_unless_asked():
    with standin():
        conv, x = nn.Conv2d(3, 4, 3).cuda(), torch.randn(2, 3, 8, 8).cuda()
        def grad(m=conv, inp=x):
            m.zero_grad(); m(inp).square().sum().backward(); return m.weight.grad.cpu().clone()
        gs = [grad() for _ in range(4)]
        assert not all(torch.equal(gs[0], g) for g in gs[1:])
        for g in gs[1:]: torch.testing.assert_close(g, gs[0])  # within rounding
        with torch.backends.cudnn.flags(enabled=True, deterministic=True): assert torch.equal(grad(), grad())
        pool = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)).cuda()
        torch.use_deterministic_algorithms(True)
        try:
            raises(lambda: pool(x).sum().backward(), 'adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation')
            env = os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
            try: raises(lambda: nn.Linear(3, 2).cuda()(torch.randn(2, 3).cuda()), 'CUBLAS_WORKSPACE_CONFIG')
            finally:
                if env is not None: os.environ['CUBLAS_WORKSPACE_CONFIG'] = env
            torch.use_deterministic_algorithms(True, warn_only=True)
            pool(x).sum().backward(); nn.Linear(3, 2).cuda()(torch.randn(2, 3).cuda())
        finally: torch.use_deterministic_algorithms(False)

def test_gpu_ordinals_and_the_cuda_api():
    with standin():
        raises(lambda: torch.cuda.set_device(1), 'invalid device ordinal')
        raises(lambda: torch.ones(2).to('cuda:1'), 'invalid device ordinal')
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); e1.record(); assert e0.elapsed_time(e1) >= 0
    with standin(n_gpus=2):
        torch.cuda.set_device(1)
        try:
            d = torch.ones(2).cuda()
            assert d.device == torch.device('cuda', 1)
            raises(lambda: d + torch.ones(2).to('cuda:0'), 'cuda:0, cuda:1')
        finally: torch.cuda.set_device(0)

def test_pinned_memory_and_loaders():
    with standin():
        ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
        dl = torch.utils.data.DataLoader(ds, batch_size=4, pin_memory=True)
        assert [len(yb) for _, yb in dl] == [4, 4, 2]
        xb = next(iter(dl))[0].to('cuda', non_blocking=True)
        assert xb.device.type == 'cuda'

def test_autocast_on_the_device_computes_in_low_precision():
    with standin():
        lin, x = nn.Linear(3, 2).cuda(), torch.randn(4, 3).cuda()
        with torch.autocast('cuda', dtype=torch.bfloat16): assert lin(x).dtype == torch.bfloat16
        with torch.autocast('cuda', dtype=torch.bfloat16): assert nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.float32  # CUDA autocast leaves the CPU alone
        assert lin(x).dtype == torch.float32

def test_off_again_torch_is_as_it_was():
    was = cs.enabled()
    real = torch.cuda.is_available.__module__, torch.Generator, torch.Tensor.pin_memory
    with standin(): pass
    if not was:
        assert (torch.cuda.is_available.__module__, torch.Generator, torch.Tensor.pin_memory) == real
        assert torch.Generator is torch._C.Generator and not torch.cuda.is_available()

def test_cpu_work_is_the_same_with_the_stand_in():
    "Nowhere else: a fit that never asks for the device gives the same bits with and without the stand-in."
    def fit():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 3))
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
        for _ in range(5): F.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad()
        return [p.detach().clone() for p in m.parameters()]
    with standin(): a = fit()
    b = fit()
    assert all(torch.equal(p, q) for p, q in zip(a, b))

_NCCL = r'''
import os, sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
r = int(os.environ['RANK'])
torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
dist.init_process_group('nccl')
what = sys.argv[1]
try:
    if what == 'host':
        dist.all_reduce(torch.ones(3))
    elif what == 'ddp_host':
        DDP(nn.Linear(3, 2))
    else:
        t = torch.full((3,), float(r + 1)).cuda(); dist.all_reduce(t)
        m = DDP(nn.Linear(3, 2).cuda(), device_ids=[r])
        m(torch.ones(4, 3)).sum().backward()  # the input moved to the module's GPU, as DDP does with device_ids
        if r == 1: print('OK', t.cpu().tolist(), m.module.weight.grad.device)
finally:
    dist.barrier()  # both ranks done before either tears the group down
    dist.destroy_process_group()
'''

@pytest.mark.parametrize('what,gpus,expect', [('host', 2, 'No backend type associated with device type cpu'),
                                              ('ddp_host', 2, 'No backend type associated with device type cpu'),
                                              ('device', 2, 'OK [3.0, 3.0, 3.0] cuda:1'), ('device', 1, 'invalid device ordinal')])
def test_nccl_takes_device_tensors_only(tmp_path, what, gpus, expect):
    from course_lib.distributed import free_port
    (tmp_path/'w.py').write_text(_NCCL)
    env = {**os.environ, 'COURSE_STANDIN': 'cuda', 'COURSE_STANDIN_GPUS': str(gpus), 'PYTHONPATH': os.pathsep.join([str(STANDIN), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), str(tmp_path/'w.py'), what]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert expect in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert (r.returncode == 0) == expect.startswith('OK')
