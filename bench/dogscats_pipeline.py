"""How fast does lesson 8's dogs-vs-cats pipeline feed a GPU? Photos per CPU-second of the loaders alone (no model):
the first call and epoch (the data made, the validation photos included, then one pass over the training photos),
the later epochs, and the validation of a later call (the data made again, then one pass over the validation photos).
(a) As lesson 8 loaded them before appendix 8b: torchvision `ImageFolder`s decoding, resizing (`Resize(sz)`) and
cropping (`RandomCrop`/`CenterCrop`) every photo with PIL on every epoch in the main process, the validation set
decoded again on every call. (b) With appendix 8b's cache, as `dogscats_data` uses it: each photo decoded and resized
once into a memory-mapped file (`photo_cache`, on the first call), then each epoch's crops cut out of it
(`crop_dl`); the validation crops read back from the cache and handed out as slices (`slice_dl`).

    .venv/bin/python bench/dogscats_pipeline.py [--sz 224] [--bs 64] [--epochs 3] [--large 400] [--workers 0]

The photos are the data set lesson 8 loads (the offline mirror's are small, at most 256 px); `--large N` adds a run on
N of them blown up to 500 px on the longer side and saved as JPEG (quality 90), like the photos of fast.ai's full
download. CPU time is the process's, with its finished workers' (`--workers`); other jobs on a shared machine disturb it
less than the wall clock. For the GPU's side: an H100 is quoted at about 7,000-9,000 photos a second for resnet34 at
224 px, 20,000+ with the body frozen; the last lines say how many cores each pipeline needs for 8,000 a second.
"""
from __future__ import annotations
import argparse, os, resource, sys, tempfile
from pathlib import Path
import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from course_lib.training import Dataset
from course_lib.datasets import image_folders, load_dogscats, open_image


def cpu():
    "CPU seconds of this process and of its children that have finished."
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

def rate(n, f):
    "Photos per CPU-second of `f()`, which handles `n` photos."
    t0 = cpu(); f(); return n / max(cpu() - t0, 1e-9)

def drain(dl):
    for _ in dl: pass

def before(root, sz, bs, workers):
    "(a): lesson 8's loaders before the cache: every photo decoded by PIL on every epoch, validation decoded on each call."
    tds, vds = image_folders(root, T.Compose([T.Resize(sz), T.RandomCrop(sz), T.PILToTensor()]),
                             T.Compose([T.Resize(sz), T.CenterCrop(sz), T.PILToTensor()]))
    train = torch.utils.data.DataLoader(tds, bs, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=workers)
    def call():  # what each call of the old dogscats_data did: decode the validation photos
        return torch.utils.data.DataLoader(Dataset(torch.stack([vds[i][0] for i in range(len(vds))]), torch.tensor(vds.targets)), 2*bs)
    def first(): call(); drain(train)
    return len(tds), len(vds), first, (lambda: drain(train)), (lambda: drain(call()))

def after(root, sz, bs, workers):
    "(b): appendix 8b's cache as `dogscats_data` uses it: decoded on the first call, crops cut from it after."
    from course_lib.photos import photo_cache, crop_dl, slice_dl
    tds, vds = image_folders(root)
    g, dl = torch.Generator().manual_seed(0), []
    def call():
        tc, vc = photo_cache(tds.samples, sz, root, workers), photo_cache(vds.samples, sz, root, workers)
        return crop_dl(tc, bs, g, workers), slice_dl(Dataset(vc.crops(range(len(vc))), vc.y), 2*bs)
    def first(): dl.append(call()[0]); drain(dl[0])
    return len(tds), len(vds), first, (lambda: drain(dl[0])), (lambda: drain(call()[1]))

def large_copy(root, n, dest, side=500):
    "`n` photos of `root` (half train, half valid, both classes) blown up to `side` px on the longer side, as JPEG."
    from PIL import Image
    for split, k in (('train', n // 2), ('valid', n - n // 2)):
        for c in ('cats', 'dogs'):
            (dest/split/c).mkdir(parents=True, exist_ok=True)
            for f in sorted((Path(root)/split/c).iterdir())[:k // 2]:
                im = open_image(f); w, h = im.size; s = side / max(w, h)
                im.resize((round(w * s), round(h * s)), Image.BICUBIC).save(dest/split/c/(f.stem + '.jpg'), quality=90)
    return dest

def bench(name, root, args):
    print(f'\n{name}: {root}')
    res = {}
    for label, make in (('before (decode every epoch)', before), ('after (decoded once)', after)):
        n_tr, n_va, first, later, valid = make(root, args.sz, args.bs, args.workers)
        r1 = rate(n_tr + n_va, first)
        rl = sorted(rate(n_tr, later) for _ in range(max(1, args.epochs - 1)))[max(0, args.epochs - 2) // 2]  # the median
        rv = rate(n_va, valid)
        res[label] = (r1, rl, rv)
        print(f'  {label:<28} first call and epoch {r1:>7,.0f}  later epochs {rl:>7,.0f}  validation {rv:>7,.0f}'
              f'  photos per CPU-second ({n_tr:,} + {n_va:,} photos, {args.sz} px)')
    (b1, bl, bv), (a1, al, av) = res.values()
    print(f'  after / before: first call and epoch {a1 / b1:.1f}x, later epochs {al / bl:.1f}x, validation {av / bv:.1f}x')
    for label, (_, rl, _) in res.items(): print(f'  {label:<30} cores for 8,000 photos a second in later epochs: {8000 / rl:.2f}')

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--sz', type=int, default=224); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--epochs', type=int, default=3); p.add_argument('--large', type=int, default=400)
    p.add_argument('--workers', type=int, default=0); p.add_argument('--threads', type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {args.threads} thread(s), {args.workers} worker(s), load average {os.getloadavg()[0]:.1f}')
    root = Path(load_dogscats()[0].root).parent
    with tempfile.TemporaryDirectory() as d:
        os.environ['COURSE_DATA'] = str(Path(d)/'data')  # a fresh photo cache, made in the first epoch
        (Path(d)/'data').mkdir()
        bench('the photos lesson 8 loads', root, args)
        if args.large: bench(f'{args.large} of them at 500 px, JPEG', large_copy(root, args.large, Path(d)/'large'/'dogscats'), args)
