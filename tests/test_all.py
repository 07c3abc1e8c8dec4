"""`from course_lib.all import *` brings every exported name and the names the course's cells use; course-style cells,
and the seed lesson's `create_learner`/`get_model_func` cells as written, run after that one line in a fresh interpreter."""
import importlib, os, pkgutil, subprocess, sys, textwrap
import pytest
import course_lib, course_lib.all as A
from course_lib.data import DataNotFoundError

def lesson_modules():
    return [importlib.import_module(f'course_lib.{m.name}') for m in pkgutil.iter_modules(course_lib.__path__)
            if not m.name.startswith('_') and m.name != 'all']

def test_every_lesson_module_is_imported():
    src = open(A.__file__).read()
    missing = [m.__name__ for m in lesson_modules() if f'from .{m.__name__.split(".")[-1]} import *' not in src]
    assert not missing, f'nbs/99_all.ipynb does not import {missing}'

def test_every_exported_name_is_there_and_no_two_lessons_share_one():
    for m in lesson_modules():
        for n in m.__all__:
            assert n in A.__all__, (m.__name__, n)
            assert getattr(A, n) is getattr(m, n), f'{m.__name__}.{n} is shadowed by another module'

def test_the_names_course_cells_take_for_granted():
    import math, functools, pathlib, torch, matplotlib.pyplot as plt
    from torch import nn, optim
    import torch.nn.functional as F
    from fastcore.test import test_eq
    ns = {}
    exec('from course_lib.all import *', ns)
    for n, o in dict(torch=torch, nn=nn, F=F, optim=optim, init=nn.init, tensor=torch.tensor, partial=functools.partial,
                     math=math, plt=plt, Path=pathlib.Path, DataLoader=torch.utils.data.DataLoader, test_eq=test_eq).items():
        assert ns[n] is o, n
    assert set(ns) - {'__builtins__'} == set(A.__all__)

def run_fresh(code, timeout=600):
    "Run `code` in a new interpreter (same environment, one thread) and return its stdout; fail with its stderr."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

COURSE_CELLS = '''
from course_lib.all import *
torch.manual_seed(0)
x_train, y_train = torch.randn(512, 784), torch.randint(0, 10, (512,))
x_valid, y_valid = torch.randn(128, 784), torch.randint(0, 10, (128,))
x_train, x_valid = normalize_to(x_train, x_valid)
test_near_zero(x_train.mean())
train_ds, valid_ds = Dataset(x_train, y_train), Dataset(x_valid, y_valid)
nh, bs = 50, 64
c = y_train.max().item() + 1
loss_func = F.cross_entropy
data = DataBunch(*get_dls(train_ds, valid_ds, bs), c)

test_near(torch.tensor(1e4), torch.tensor(1e4 + 5.))
model = nn.Sequential(Lambda(flatten), nn.Linear(784, 10))
test_eq(model(torch.randn(3, 1, 28, 28)).shape, (3, 10))

mnist_view = view_tfm(1, 28, 28)
cbfs = [Recorder, partial(AvgStatsCallback, accuracy), CudaCallback, partial(BatchTransformXCallback, mnist_view)]
nfs = [8, 16, 32, 32]
learn, run = get_learn_run(nfs, data, 0.4, conv_layer, cbs=cbfs)
test_eq(learn.opt.param_groups[0]['momentum'], 0)
with Hooks(learn.model, append_stats) as hooks:
    run.fit(1, learn)
    ms, ss, hi = hooks[0].stats
def get_hist(h): return torch.stack(h.stats[2]).t().float().log1p()
test_eq(len(ms), len(data.train_dl))
test_eq(get_hist(hooks[0]).shape, (40, len(data.train_dl)))
test_eq(len(hooks[[True, False] * 3 + [True]]), 4)
convs = find_modules(learn.model, lambda o: isinstance(o, nn.Conv2d))
test_eq([c.out_channels for c in convs], nfs)
test_eq(len(children(learn.model)), 7)
print(model_summary(run, learn, data, find_all=True))
init.kaiming_normal_(convs[0].weight, a=math.sqrt(5))
plt.plot(run.recorder.lrs)
test_eq(ListContainer(range(10))[[1, 2]], [1, 2])
print('course cells ran')
'''

def test_course_cells_run_after_the_one_import():
    assert 'course cells ran' in run_fresh(COURSE_CELLS)

# The seed lesson's cells (lesson 9, "05_anneal"), as written: the data, `create_learner` and `get_model_func`
# (which the seed defines itself and the library also exports), three fits, the schedule and the recorder's plots.
SEED_CELLS = '''
from course_lib.all import *
x_train,y_train,x_valid,y_valid = get_data()
train_ds,valid_ds = Dataset(x_train, y_train),Dataset(x_valid, y_valid)
nh,bs = 50,512
c = y_train.max().item() + 1
loss_func = F.cross_entropy
data = DataBunch(*get_dls(train_ds, valid_ds, bs), c)
#export
def create_learner(model_func, loss_func, data):
    return Learner(*model_func(data), loss_func, data)
learn = create_learner(get_model, loss_func, data)
run = Runner([AvgStatsCallback([accuracy])])

run.fit(3, learn)
learn = create_learner(partial(get_model, lr=0.3), loss_func, data)
run = Runner([AvgStatsCallback([accuracy])])

run.fit(3, learn)
#export
def get_model_func(lr=0.5): return partial(get_model, lr=lr)
sched = combine_scheds([0.3, 0.7], [sched_cos(0.3, 0.6), sched_cos(0.6, 0.2)])
cbfs = [Recorder,
        partial(AvgStatsCallback, accuracy),
        partial(ParamScheduler, 'lr', sched)]
learn = create_learner(get_model_func(0.3), loss_func, data)
run = Runner(cb_funcs=cbfs)
run.fit(3, learn)
run.recorder.plot_lr()
run.recorder.plot_loss()
'''

def test_seed_cells_run_as_written():
    from course_lib.datasets import get_data
    try: get_data()
    except DataNotFoundError as e: pytest.skip(f'Fashion-MNIST not available: {e}')
    checks = '''
    loss, acc = run.avg_stats.valid_stats.avg_stats
    assert 0.75 < acc < 0.95, acc
    import course_lib.anneal
    del create_learner, get_model_func  # the library's own, from the one import
    from course_lib.all import create_learner, get_model_func
    assert create_learner is course_lib.anneal.create_learner
    learn = create_learner(get_model_func(0.3), loss_func, data)
    test_eq(learn.opt.param_groups[0]['lr'], 0.3)
    print('seed cells ran')
    '''
    out = run_fresh(SEED_CELLS + textwrap.dedent(checks))
    assert 'seed cells ran' in out and out.count('epoch 2 |') == 3
