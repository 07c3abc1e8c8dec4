"""A CPU stand-in for CUDA, for CI on machines without a GPU.

With the stand-in on, `torch.cuda.is_available()` is True and a tensor moved to `'cuda'` is a CPU tensor marked as
living on the device: it keeps its values (so lessons compute what they compute on a GPU) but fails where CUDA fails.

- A device tensor meeting a host tensor that is not 0-dim in one op raises, as CUDA does ("Expected all tensors to
  be on the same device"); so does a host tensor indexed by device indices, or tensors of two GPUs.
- A device tensor turned into numpy raises (`.numpy()`, `np.asarray`, so matplotlib and fastcore's `test_eq` too);
  `.item()`, `.tolist()`, `float()`, `bool()` work, as on CUDA, and are counted in `syncs` (each is a host sync).
- Generators have a device: `torch.Generator('cuda')` draws another stream than a CPU generator with the same seed,
  a CPU generator cannot drive an op on the device nor the reverse, and their states do not fit each other. Random
  ops on the device without a generator draw from the device's own default generator (seeded by `torch.manual_seed`,
  saved by `torch.cuda.get_rng_state`), not the CPU's; the dropout of an RNN run by cuDNN draws from a state of its
  own that no RNG state holds, as cuDNN's does.
- cuDNN is not bit-exact by default: the gradients of convolutions, embeddings, adaptive pools and interpolation get
  a last-bit jitter unless `torch.backends.cudnn.deterministic` (convolutions) or `torch.use_deterministic_algorithms`
  is on; under the latter the ops CUDA has no deterministic kernel for raise in backward, and matrix products raise
  without `CUBLAS_WORKSPACE_CONFIG`, as on CUDA.
- `torch.distributed` with `backend='nccl'` runs on gloo but refuses host tensors and `DistributedDataParallel` over
  host parameters; `torch.cuda.set_device(i)` and `.to(f'cuda:{i}')` refuse an `i` past the stand-in's GPUs
  (`COURSE_STANDIN_GPUS`, 1 by default).

Switch it on for a whole process tree with `COURSE_STANDIN=cuda` and this folder on `PYTHONPATH` (its `sitecustomize`
calls `enable()`), or in-process with `with standin(): ...`. What it cannot catch: speed, memory, kernels that exist
on the CPU but not on CUDA (or the reverse), float16 rounding of ops CPU autocast leaves in float32, and code that
reads `torch.version.cuda` or the driver.
"""
from __future__ import annotations
import os, time, threading, contextlib, functools
from types import SimpleNamespace
import torch
from torch.overrides import TorchFunctionMode

__all__ = ['enable', 'disable', 'standin', 'enabled', 'on_device', 'syncs', 'reset_syncs']

# --- the mark of a device tensor: a plain attribute (class default None), the GPU's index on device tensors
torch.Tensor._sdev = None

def on_device(t):
    "The stand-in GPU index of tensor `t`, or None for a host tensor."
    return t._sdev if isinstance(t, torch.Tensor) else None

def _mark(o, d):
    "Mark every tensor in `o` (a tensor, or tuples/lists of them) as on GPU `d` (None: host); return `o`."
    if isinstance(o, torch.Tensor):
        if o._sdev != d:
            if d is None: o.__dict__.pop('_sdev', None)
            else: o._sdev = d
    elif isinstance(o, (tuple, list)):
        for x in o: _mark(x, d)
    return o

S = SimpleNamespace(on=False, n_gpus=1, current=0, initialized=False, syncs=0, mode=None, patches=[], nccl=set(),
                    gens=[], cudnn_gen=None, jitter=None, quiet=threading.local())

def syncs():
    "How many times a device tensor was read back to the host (`.item()`, `.tolist()`, `float()`, ...) since `reset_syncs()`."
    return S.syncs

def reset_syncs(): S.syncs = 0

def enabled(): return S.on

# --- devices
def _ordinal(i):
    if not 0 <= i < S.n_gpus: raise RuntimeError(f'CUDA error: invalid device ordinal (device {i}; the CUDA stand-in has {S.n_gpus} GPU{"s" * (S.n_gpus > 1)})')
    return i

def _dev_index(device):
    "The stand-in GPU index for `device` (str, int or torch.device): None for the host, 'meta' for meta."
    if device is None: return None
    if isinstance(device, int): return _ordinal(device)
    device = torch.device(device)
    if device.type == 'cuda':
        S.initialized = True
        return _ordinal(S.current if device.index is None else device.index)
    return 'meta' if device.type == 'meta' else None

def _torch_device(d): return torch.device('cuda', d)

# --- generators
class _GenMeta(type(torch._C.Generator)):
    def __instancecheck__(cls, o): return isinstance(o, torch._C.Generator)
    def __subclasscheck__(cls, c): return issubclass(c, torch._C.Generator)

_MARK = torch.tensor(list(b'CUDAstandin'), dtype=torch.uint8)  # appended to a device generator's state: it fits no CPU generator

def _mix(seed): return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64  # another stream than the CPU's for a seed

class CudaGenerator(torch._C.Generator):
    "A generator of the stand-in GPU `index`: a CPU generator underneath, seeded so that its stream is not the CPU's."
    def __new__(cls, index=0):
        g = super().__new__(cls, 'cpu')
        g._index, g._seed = index, 67280421310721
        super(CudaGenerator, g).manual_seed(_mix(g._seed))
        return g
    @property
    def device(self): return torch.device('cuda', self._index)
    def manual_seed(self, seed):
        self._seed = int(seed) % 2**64
        super().manual_seed(_mix(self._seed))
        return self
    def seed(self):
        s = int.from_bytes(os.urandom(8), 'little') >> 1
        self.manual_seed(s); return s
    def initial_seed(self): return self._seed
    def get_state(self): return torch.cat([super().get_state(), _MARK])
    def set_state(self, state):
        if len(state) != len(_MARK) + 5056 or not torch.equal(state[-len(_MARK):], _MARK):
            raise RuntimeError(f'RNG state is wrong size: a state of {len(state)} bytes is not a CUDA generator\'s (CUDA stand-in)')
        super().set_state(state[:-len(_MARK)]); return self
    def __repr__(self): return f'<torch.Generator (CUDA stand-in) device=cuda:{self._index}>'

class Generator(torch._C.Generator, metaclass=_GenMeta):
    "`torch.Generator` with the stand-in on: `Generator('cuda')` makes a `CudaGenerator`."
    def __new__(cls, device='cpu'):
        d = _dev_index(device)
        return CudaGenerator(d) if isinstance(d, int) else torch._C.Generator(device)

def _gen_dev(g): return g._index if isinstance(g, CudaGenerator) else _dev_index(g.device)

# --- what the mode does
def _scan(args, kwargs):
    "(set of GPU indices of device tensors, any host tensor of 1+ dims?, generators) among the arguments, one level into lists."
    devs, host, gens = set(), False, []
    def look(o):
        nonlocal host
        if isinstance(o, torch.Tensor):
            d = o._sdev
            if d is None: host = host or (o.dim() > 0 and o.device.type == 'cpu')
            elif d != 'meta': devs.add(d)
        elif isinstance(o, torch._C.Generator): gens.append(o)
    for a in args:
        if isinstance(a, (list, tuple)):
            for x in a: look(x)
        else: look(a)
    for a in kwargs.values():
        if isinstance(a, (list, tuple)):
            for x in a: look(x)
        else: look(a)
    return devs, host, gens

def _mixed(name, devs):
    d = sorted(devs, key=str)
    where = ', '.join(f'cuda:{i}' for i in d) + (' and cpu' if len(d) == 1 else '')
    return RuntimeError(f'Expected all tensors to be on the same device, but found at least two devices, {where}! '
                        f'(CUDA stand-in, in {name})')

_RANDOM = {'rand', 'randn', 'randint', 'randperm', 'rand_like', 'randn_like', 'randint_like', 'bernoulli', 'bernoulli_',
           'normal', 'normal_', 'uniform_', 'exponential_', 'geometric_', 'log_normal_', 'cauchy_', 'random_', 'multinomial',
           'poisson', 'dropout', 'dropout_', 'alpha_dropout', 'feature_alpha_dropout', 'feature_dropout', 'dropout1d',
           'dropout2d', 'dropout3d', 'native_dropout', 'rrelu', 'rrelu_', 'rrelu_with_noise', 'gumbel_softmax'}
_RNNS = {'lstm', 'gru', 'rnn_tanh', 'rnn_relu'}
_CUDNN_CONV = {'conv1d', 'conv2d', 'conv3d', 'conv_transpose1d', 'conv_transpose2d', 'conv_transpose3d', 'convolution'}
_ATOMIC = {'embedding', 'index_add', 'index_add_', 'scatter_add', 'scatter_add_'}            # deterministic only when asked
_NO_DETERMINISTIC = {'adaptive_avg_pool2d', 'adaptive_avg_pool3d', 'adaptive_max_pool2d', 'avg_pool3d', 'interpolate',
                     'upsample', 'upsample_bilinear', 'max_unpool1d', 'max_unpool2d', 'max_unpool3d'}  # no deterministic CUDA kernel
_CUBLAS = {'mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear', 'bilinear', 'einsum', 'addbmm', 'lstm', 'gru', 'rnn_tanh',
           'rnn_relu', 'tensordot', 'mv', 'addmv', '__matmul__', 'chain_matmul', 'multi_dot'}
_HOST_READS = {'item', 'tolist', '__float__', '__int__', '__bool__', '__index__', '__complex__', '__format__'}
_FACTORY_FROM_DATA = {'tensor', 'as_tensor', 'asarray', 'from_numpy', 'frombuffer', 'scalar_tensor', 'sparse_coo_tensor'}

class _Jitter(torch.autograd.Function):
    "Identity forward; a last-bit jitter on the gradient, as GPU kernels that add with atomics give (or an error)."
    @staticmethod
    def forward(ctx, x, name, raise_):
        ctx.name, ctx.raise_ = name, raise_
        return x.view_as(x)
    @staticmethod
    def backward(ctx, g):
        if ctx.raise_ and torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(f"{ctx.name}_backward_cuda does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)' (CUDA stand-in)")
        if S.jitter is None: S.jitter = torch._C.Generator('cpu').manual_seed(int.from_bytes(os.urandom(7), 'little'))
        noise = torch.randint(-1, 2, g.shape, generator=S.jitter).to(g.dtype) * torch.finfo(g.dtype).eps / 2
        return g + g * noise, None, None

def _deterministic(name):
    if torch.are_deterministic_algorithms_enabled(): return True
    return name in _CUDNN_CONV and torch.backends.cudnn.deterministic

@contextlib.contextmanager
def _cpu_rng(g):
    "Run the block with the CPU's default generator in the state of `g`, which then takes the state it ends in."
    cpu = torch.default_generator
    saved = cpu.get_state()
    cpu.set_state(torch._C.Generator.get_state(g))
    try: yield
    finally:
        torch._C.Generator.set_state(g, cpu.get_state())
        cpu.set_state(saved)

def _default_gen(d):
    _lazy_init()  # drawing on the device: CUDA is in use
    return S.gens[d]

def _cudnn_gen():
    "cuDNN's RNN dropout state: seeded once from the device generator, then its own (no RNG state holds it)."
    if S.cudnn_gen is None:
        seed = int(torch.randint(0, 2**62, (), generator=_default_gen(S.current)))
        S.cudnn_gen = torch._C.Generator('cpu').manual_seed(seed)
    return S.cudnn_gen

class StandinMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        if name in ('__get__', '__set__'): return self._prop(func, name, args)
        func, name = _unspied(func, name)
        h = _HANDLERS.get(name)
        if h is not None: return h(func, args, kwargs)
        if name in _NEUTRAL: return func(*args, **kwargs)
        devs, host, gens = _scan(args, kwargs)
        if name in _FACTORY_FROM_DATA and not (args and isinstance(args[0], torch.Tensor)): devs = set()  # reads its data, like .item()
        if kwargs.get('device') is not None:  # a factory or a conversion: device= says where the result goes
            out = _dev_index(kwargs['device'])
            if out == 'meta': return func(*args, **kwargs)
            if isinstance(out, int): kwargs = {**kwargs, 'device': 'cpu'}
        else:
            if not devs:
                if any(isinstance(g, CudaGenerator) for g in gens): raise _gen_error('cpu', 'cuda')
                return func(*args, **kwargs)
            if len(devs) > 1 or (host and name not in _MIX_OK): raise _mixed(name, devs)
            out = next(iter(devs))
        for g in gens:
            if _gen_dev(g) != out: raise _gen_error(*('cuda' if isinstance(o, int) else 'cpu' for o in (out, _gen_dev(g))))
        if out is None: return func(*args, **kwargs)
        return _mark(self._run(func, name, args, kwargs, out, gens), out)

    def _run(self, func, name, args, kwargs, d, gens):
        if torch.are_deterministic_algorithms_enabled() and name in _CUBLAS and not torch.is_deterministic_algorithms_warn_only_enabled() \
                and os.environ.get('CUBLAS_WORKSPACE_CONFIG') not in (':4096:8', ':16:8'):
            raise RuntimeError('Deterministic behavior was enabled with torch.use_deterministic_algorithms(True), but this operation is '
                               'not deterministic because it uses CuBLAS: set CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8 before CUDA starts '
                               f'(CUDA stand-in, in {name})')
        ctx = contextlib.nullcontext()
        if name in _RNNS and _rnn_dropout(args) and torch.backends.cudnn.enabled: ctx = _cpu_rng(_cudnn_gen())
        elif (name in _RANDOM or name in _RNNS) and not gens: ctx = _cpu_rng(_default_gen(d))
        if torch.is_autocast_enabled('cuda'):
            ac = torch.autocast('cpu', dtype=torch.get_autocast_dtype('cuda'))
            with ctx, ac: out = func(*args, **kwargs)
        else:
            with ctx: out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
            if name in _NO_DETERMINISTIC: out = _Jitter.apply(out, name, True)
            elif (name in _CUDNN_CONV or name in _ATOMIC) and not _deterministic(name): out = _Jitter.apply(out, name, False)
        return out

    def _prop(self, func, name, args):
        prop = getattr(getattr(func, '__self__', None), '__name__', '')
        t = args[0]
        if name == '__set__':
            if prop == 'data' and isinstance(args[1], torch.Tensor):
                res = func(*args); _mark(t, args[1]._sdev); return res
            if prop == 'grad' and isinstance(args[1], torch.Tensor) and args[1]._sdev != t._sdev:
                raise RuntimeError(f'assigned grad has data located on {_where(args[1])}, but the tensor is on {_where(t)} (CUDA stand-in)')
            return func(*args)
        d = t._sdev if isinstance(t, torch.Tensor) else None
        if d is None or d == 'meta': return func(*args)
        if prop == 'device': return _torch_device(d)
        if prop == 'is_cuda': return True
        if prop == 'is_cpu': return False
        res = func(*args)
        return _mark(res, d) if isinstance(res, torch.Tensor) else res

def _unspied(func, name):
    "(function, name) to run: for a Tensor method a test replaced to spy on it, the method underneath, so the spy counts one call."
    mod = getattr(func, '__module__', None)
    if mod is None or mod.startswith('torch'): return func, name
    real = next((k for k, v in vars(torch.Tensor).items() if v is func), name)
    return torch._C.TensorBase.__dict__.get(real, func), real

def _where(t): return 'cpu' if t._sdev is None else f'cuda:{t._sdev}'

def _gen_error(op, gen): return RuntimeError(f"Expected a '{op}' device type for generator but found '{gen}' (CUDA stand-in)")

def _rnn_dropout(args):
    "Is this `_VF.lstm`/`gru`/`rnn_*` call training with dropout? (its args: ..., has_biases, num_layers, dropout, train, ...)"
    ps, bs = [a for a in args if type(a) is float], [a for a in args if type(a) is bool]
    return bool(ps) and ps[0] > 0 and len(bs) >= 2 and bs[1]

_NEUTRAL = {'_has_compatible_shallow_copy_type', 'is_same_size', '__hash__', 'dim', 'size', 'numel', 'stride', 'is_contiguous',
            'data_ptr', 'element_size', 'nelement', 'ndimension', 'storage_offset', 'untyped_storage', '__len__', 'is_floating_point',
            'is_complex', 'requires_grad_', 'retain_grad', 'register_hook', '_is_view'}
_MIX_OK = {'copy_', '__getitem__', '__setitem__', 'index_put_', 'index_put', '_index_put_impl_', 'set_'}

# --- Tensor methods with their own rules
def _h_to(func, args, kwargs):
    t = args[0]
    if len(args) > 1 and isinstance(args[1], torch.Tensor):  # x.to(other): other's device and dtype
        o = args[1]
        target = o._sdev if o.device.type != 'meta' else 'meta'
        rest = dict(kwargs); rest.setdefault('dtype', o.dtype)
        if target == 'meta' or (t.device.type == 'meta'): return func(*args, **kwargs)
        return _move(t, target, lambda: torch.Tensor.to(t, **{k: v for k, v in rest.items() if k in ('dtype', 'non_blocking', 'copy', 'memory_format')}))
    device, dtype, non_blocking, mf = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != 'copy'})
    if device is not None and device.type == 'meta' or t.device.type == 'meta': return func(*args, **kwargs)
    target = t._sdev if device is None else _dev_index(device)
    kw = {'dtype': dtype or t.dtype, 'non_blocking': non_blocking, 'copy': kwargs.get('copy', False)}
    if mf is not None: kw['memory_format'] = mf
    return _move(t, target, lambda: func(t, **kw))

def _move(t, target, convert):
    out = convert()
    if target != t._sdev and out is t: out = t.clone(memory_format=torch.preserve_format)  # a move is a copy
    return _mark(out, target)

def _h_cuda(func, args, kwargs):
    t, dev = args[0], (args[1] if len(args) > 1 else kwargs.get('device'))
    target = _dev_index('cuda' if dev is None else (dev if not isinstance(dev, int) else f'cuda:{dev}'))
    return _move(t, target, lambda: t)

def _h_cpu(func, args, kwargs):
    t = args[0]
    if t._sdev is None or t._sdev == 'meta': return func(*args, **kwargs)
    _count()
    return _mark(t.clone(memory_format=torch.preserve_format), None)

def _count(): S.syncs += 1

def _h_numpy(func, args, kwargs):
    t = args[0]
    if isinstance(t._sdev, int) and kwargs.get('force'): _count(); return func(*args, **kwargs)
    if isinstance(t._sdev, int):
        raise TypeError(f"can't convert cuda:{t._sdev} device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first. (CUDA stand-in)")
    return func(*args, **kwargs)

def _h_read(func, args, kwargs):
    t = args[0]
    if isinstance(t, torch.Tensor) and isinstance(t._sdev, int): _count()
    return func(*args, **kwargs)

def _h_index(func, args, kwargs):
    "Indexing: a device tensor takes host indices; a host tensor refuses device indices."
    t, idx = args[0], args[1]
    devs, _, _ = _scan(idx if isinstance(idx, tuple) else (idx,), {})
    if t._sdev is None:
        if devs: raise RuntimeError(f'indices should be either on cpu or on the same device as the indexed tensor (cpu) (CUDA stand-in, in {func.__name__})')
        if func.__name__ == '__setitem__' and len(args) > 2 and isinstance(args[2], torch.Tensor) and isinstance(args[2]._sdev, int) and args[2].dim() > 0:
            return func(*args, **kwargs)  # a copy from the device, as `copy_`
        return func(*args, **kwargs)
    if len(devs - {t._sdev}): raise _mixed(func.__name__, devs | {t._sdev})
    out = func(*args, **kwargs)
    return _mark(out, t._sdev) if isinstance(out, torch.Tensor) else out

def _h_repr(func, args, kwargs):
    t = args[0]
    s = func(*args, **kwargs)
    if isinstance(t._sdev, int) and s.endswith(')'): s = s[:-1] + f", device='cuda:{t._sdev}')"
    return s

def _h_iter(func, args, kwargs):
    t = args[0]
    items = list(func(*args, **kwargs))
    return iter(_mark(items, t._sdev) if isinstance(t._sdev, int) else items)

def _h_pin(func, args, kwargs): return args[0]
def _h_is_pinned(func, args, kwargs): return True

def _h_cat(func, args, kwargs):
    "cat and stack: every tensor on one device, 0-dim ones included."
    ts = [t for t in (args[0] if args else kwargs.get('tensors', ())) if isinstance(t, torch.Tensor)]
    where = {t._sdev for t in ts if t._sdev != 'meta'}
    if len(where) > 1: raise _mixed(func.__name__, {d for d in where if d is not None})
    d = next(iter(where), None)
    return _mark(func(*args, **kwargs), d) if d is not None else func(*args, **kwargs)

def _h_reduce(func, args, kwargs):
    "Pickling (`torch.save`, sending to a process): the mark stays out of the file, as a device is not a tensor attribute."
    t = args[0]
    d = t.__dict__.pop('_sdev', None)
    try: return func(*args, **kwargs)
    finally:
        if d is not None: t._sdev = d

def _h_get_device(func, args, kwargs): return args[0]._sdev if isinstance(args[0]._sdev, int) else func(*args, **kwargs)

_HANDLERS = {'__reduce_ex__': _h_reduce, '__getstate__': _h_reduce, 'get_device': _h_get_device, 'to': _h_to, 'cuda': _h_cuda, 'cpu': _h_cpu, 'numpy': _h_numpy, '__array__': _h_numpy,
             '__iter__': _h_iter, '__getitem__': _h_index, '__setitem__': _h_index, '__repr__': _h_repr, 'pin_memory': _h_pin,
             'is_pinned': _h_is_pinned, 'cat': _h_cat, 'stack': _h_cat, 'concat': _h_cat, 'concatenate': _h_cat,
             'hstack': _h_cat, 'vstack': _h_cat, 'dstack': _h_cat, **{n: _h_read for n in _HOST_READS}}

# --- torch.cuda, played
def _gens():
    "The GPUs' default generators (made on first use; seeding them does not start CUDA, as in torch)."
    if not S.gens: S.gens = [CudaGenerator(i) for i in range(S.n_gpus)]
    return S.gens

def _lazy_init():
    _gens()
    S.initialized = True

def _set_device(d):
    d = d.index if isinstance(d, torch.device) else (torch.device(d).index if isinstance(d, str) else d)
    S.current = _ordinal(0 if d is None else d)

class _device_ctx:
    def __init__(self, d): self.d, self.prev = d, None
    def __enter__(self):
        self.prev = S.current
        if self.d is not None and (not isinstance(self.d, int) or self.d >= 0): _set_device(self.d)
    def __exit__(self, *exc): S.current = self.prev

class _Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False): self.t = None
    def record(self, stream=None): self.t = time.perf_counter()
    def synchronize(self): pass
    def wait(self, stream=None): pass
    def query(self): return True
    def elapsed_time(self, end): return (end.t - self.t) * 1000

class _Stream:
    def __init__(self, device=None, priority=0, **kw): self.device = _torch_device(S.current)
    def synchronize(self): pass
    def wait_stream(self, s): pass
    def wait_event(self, e): pass
    def record_event(self, e=None): e = e or _Event(); e.record(); return e
    def query(self): return True
    def is_capturing(self): return False
    def __enter__(self): return self
    def __exit__(self, *exc): pass

def _props(d=None):
    return SimpleNamespace(name='CUDA stand-in (CPU)', major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132,
                           is_integrated=False, is_multi_gpu_board=False)

def _gens_of(device):
    _lazy_init()
    d = S.current if device is None or device == 'cuda' else _dev_index(device)
    return S.gens[d]

def _cuda_api():
    def manual_seed(seed): _gens()[S.current].manual_seed(seed)
    def manual_seed_all(seed):
        for g in _gens(): g.manual_seed(seed)  # torch queues this until CUDA starts: not a start
    def get_rng_state(device='cuda'): return _gens_of(device).get_state()
    def set_rng_state(state, device='cuda'): _gens_of(device).set_state(state)
    def get_rng_state_all(): _lazy_init(); return [g.get_state() for g in S.gens]
    def set_rng_state_all(states):
        _lazy_init()
        for g, s in zip(S.gens, states): g.set_state(s)
    def seed(): return _gens_of(None).seed()
    def seed_all():
        s = _gens()[0].seed()
        for g in S.gens[1:]: g.manual_seed(s)
    def exchange(d):
        prev = S.current
        if d is not None and d >= 0: _set_device(d)
        return prev
    zero = lambda *a, **k: 0
    return dict(_exchange_device=exchange, _maybe_exchange_device=exchange,
                device_of=lambda t: _device_ctx(t._sdev if isinstance(getattr(t, '_sdev', None), int) else None), is_available=lambda: True, device_count=lambda: S.n_gpus, current_device=lambda: S.current,
                set_device=_set_device, device=_device_ctx, is_initialized=lambda: S.initialized, _lazy_init=_lazy_init,
                init=_lazy_init, synchronize=lambda device=None: None, get_device_name=lambda device=None: _props().name,
                get_device_properties=_props, get_device_capability=lambda device=None: (9, 0),
                is_bf16_supported=lambda including_emulation=True: True, empty_cache=lambda: None,
                memory_allocated=zero, max_memory_allocated=zero, memory_reserved=zero, max_memory_reserved=zero,
                reset_peak_memory_stats=lambda device=None: None, mem_get_info=lambda device=None: (79 * 2**30, 80 * 2**30),
                Event=_Event, Stream=_Stream, current_stream=lambda device=None: _Stream(), default_stream=lambda device=None: _Stream(),
                stream=lambda s=None: contextlib.nullcontext(s), manual_seed=manual_seed, manual_seed_all=manual_seed_all,
                get_rng_state=get_rng_state, set_rng_state=set_rng_state, get_rng_state_all=get_rng_state_all,
                set_rng_state_all=set_rng_state_all, seed=seed, seed_all=seed_all, initial_seed=lambda: _gens_of(None).initial_seed(),
                get_arch_list=lambda: ['sm_90'], is_current_stream_capturing=lambda: False)

def _accelerator_api():
    return dict(is_available=lambda check_available=False: True, current_accelerator=lambda check_available=False: torch.device('cuda'),
                device_count=lambda: S.n_gpus, current_device_index=lambda: S.current, current_device_idx=lambda: S.current,
                set_device_index=_set_device, set_device_idx=_set_device, synchronize=lambda device=None: None,
                current_stream=lambda device=None: _Stream(), empty_cache=lambda: None)

# --- torch.distributed with NCCL, played on gloo
def _pg(group):
    import torch.distributed as dist
    return dist.distributed_c10d._get_default_group() if group is None else group

def _nccl_check(name, tensors, group):
    if S.quiet.__dict__.get('on') or _pg(group) not in S.nccl: return
    for t in tensors:
        if isinstance(t, torch.Tensor) and not isinstance(t._sdev, int):
            raise RuntimeError(f'No backend type associated with device type cpu: {name} of a host tensor over NCCL '
                               '(NCCL reduces CUDA tensors only; CUDA stand-in)')

def _dist_patches():
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    from torch.nn.parallel import DistributedDataParallel as DDP
    ps = []
    init = c10d.init_process_group
    def init_process_group(backend=None, *a, **k):
        b = str(backend).lower() if backend is not None else None
        res = init(backend='gloo' if b is not None and 'nccl' in b else backend, *a, **k)
        if b == 'nccl': S.nccl.add(c10d._get_default_group())
        return res
    destroy = c10d.destroy_process_group
    def destroy_process_group(group=None):
        S.nccl.discard(_pg(group)); return destroy(group)
    get_backend = c10d.get_backend
    def get_backend_(group=None): return 'nccl' if _pg(group) in S.nccl else get_backend(group)
    def checked(name, f, pick):
        @functools.wraps(f)
        def inner(*a, **k):
            _nccl_check(name, pick(a, k), k.get('group', None))
            return f(*a, **k)
        return inner
    first = lambda a, k: [a[0] if a else k.get('tensor')]
    lists = lambda a, k: [t for o in (list(a[:2]) + [k.get('tensor_list'), k.get('tensor'), k.get('output_tensor_list')]) for t in (o if isinstance(o, (list, tuple)) else [o])]
    def quiet(f):
        @functools.wraps(f)
        def inner(*a, **k):
            S.quiet.on = True
            try: return f(*a, **k)
            finally: S.quiet.on = False
        return inner
    for mod in (dist, c10d):
        ps += [(mod, 'init_process_group', init_process_group), (mod, 'destroy_process_group', destroy_process_group),
               (mod, 'get_backend', get_backend_), (mod, 'is_nccl_available', lambda: True)]
        for n in ('all_reduce', 'broadcast', 'reduce'): ps.append((mod, n, checked(n, getattr(c10d, n), first)))
        for n in ('all_gather', 'all_gather_into_tensor', 'reduce_scatter', 'all_to_all'): ps.append((mod, n, checked(n, getattr(c10d, n), lists)))
        for n in ('broadcast_object_list', 'all_gather_object', 'gather_object', 'scatter_object_list'): ps.append((mod, n, quiet(getattr(c10d, n))))
    ddp_init, ddp_forward = DDP.__init__, DDP.forward
    def __init__(self, module, device_ids=None, output_device=None, *a, **k):
        group = k.get('process_group')
        params = [p for p in module.parameters()]
        devs = {p._sdev for p in params}
        if _pg(group) in S.nccl and None in devs:
            raise RuntimeError('No backend type associated with device type cpu: DistributedDataParallel over NCCL with module '
                               'parameters on the CPU (CUDA stand-in)')
        ids = None
        if device_ids:
            if None in devs or len(devs) != 1:
                raise ValueError('DistributedDataParallel device_ids and output_device arguments only work with single-device/multiple-device '
                                 f'GPU modules or CPU modules, but got device_ids {device_ids}, output_device {output_device}, and module '
                                 f'parameters { {_where(p) for p in params} } (CUDA stand-in)')
            ids = [_dev_index(i if not isinstance(i, int) else f'cuda:{i}') for i in device_ids]
            if ids[0] not in devs: raise RuntimeError(f'DistributedDataParallel: device_ids {device_ids} but the module is on cuda:{next(iter(devs))} (CUDA stand-in)')
        ddp_init(self, module, None, None, *a, **k)
        self._standin_ids = ids
    def forward(self, *inputs, **kwargs):
        if self._standin_ids:
            mv = lambda o: o.to(f'cuda:{self._standin_ids[0]}') if isinstance(o, torch.Tensor) else o
            inputs, kwargs = tuple(mv(o) for o in inputs), {k: mv(v) for k, v in kwargs.items()}
        return ddp_forward(self, *inputs, **kwargs)
    ps += [(DDP, '__init__', __init__), (DDP, 'forward', forward)]
    return ps

# --- switching it on and off
_param_new = torch.nn.Parameter.__new__
def _param(cls, data=None, requires_grad=True):
    p = _param_new(cls, data, requires_grad)
    if isinstance(data, torch.Tensor) and data._sdev is not None and p is not data: _mark(p, data._sdev)
    return p

def _patch(obj, name, value):
    S.patches.append((obj, name, obj.__dict__.get(name, _MISSING) if isinstance(obj, type) else getattr(obj, name, _MISSING)))
    setattr(obj, name, value)

_MISSING = object()

def enable(n_gpus=None):
    "Switch the stand-in on in this process (idempotent): `n_gpus` GPUs (default `COURSE_STANDIN_GPUS`, else 1)."
    if S.on: return
    S.n_gpus = int(n_gpus or os.environ.get('COURSE_STANDIN_GPUS') or 1)
    S.current, S.initialized, S.gens, S.cudnn_gen = 0, False, [], None
    for k, v in _cuda_api().items(): _patch(torch.cuda, k, v)
    _patch(torch, 'Generator', Generator)
    _patch(torch.backends.cudnn, 'is_available', lambda: True)
    _patch(torch.backends.cudnn, 'version', lambda: 91000)
    _patch(torch.backends.cudnn, 'is_acceptable', lambda t: False)  # nothing to flatten for cuDNN
    _patch(torch.nn.Parameter, '__new__', staticmethod(_param))
    for k, v in _accelerator_api().items(): _patch(torch.accelerator, k, v)
    _patch(torch.Tensor, 'pin_memory', lambda self, device=None: self)
    _patch(torch.Tensor, 'is_pinned', lambda self, device=None: True)
    try:
        import torch.distributed as dist
        if dist.is_available():
            for o, n, v in _dist_patches(): _patch(o, n, v)
    except ImportError: pass
    S.mode = StandinMode()
    S.mode.__enter__()
    S.on = True

def disable():
    "Switch the stand-in off: torch as it was (tensors marked as on the device stay marked, but nothing reads the mark)."
    if not S.on: return
    S.mode.__exit__(None, None, None)
    for obj, name, old in reversed(S.patches):
        if old is _MISSING: delattr(obj, name)
        else: setattr(obj, name, old)
    S.patches, S.on, S.nccl = [], False, set()

@contextlib.contextmanager
def standin(n_gpus=None):
    "The stand-in on inside the block (off after it, if it was off before), with `n_gpus` GPUs if given."
    was, old = S.on, (S.n_gpus, S.current, S.gens)
    enable(n_gpus)
    if n_gpus and S.n_gpus != n_gpus:
        S.n_gpus = n_gpus
        if S.gens: S.gens = (S.gens + [CudaGenerator(i) for i in range(len(S.gens), n_gpus)])[:n_gpus]
    try: yield
    finally:
        if not was: disable()
        else: S.n_gpus, S.current, S.gens = old
