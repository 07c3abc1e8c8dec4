"Appendix 8b's photos decoded once (course_lib.photos): exact crops, the cache's life, batches, on an archive of the full download's layout."
from pathlib import Path
import numpy as np, pytest, torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from course_lib.data import untar_data
from course_lib.datasets import load_dogscats, open_image
from course_lib.training import loader_generators
import course_lib.photos as P
from course_lib.photos import *
from dogscats_archive import make_dogscats, counts


@pytest.fixture
def dogscats(data_env, tmp_path):
    "The archive of `make_dogscats`, extracted into the data dir as a download would be; its train and valid folders."
    untar_data(make_dogscats(tmp_path/'archive'))
    return load_dogscats()

def root_of(ds): return Path(ds.root).parent

def test_the_canonical_layout_loads_with_its_own_counts(dogscats):
    tds, vds = dogscats
    assert (len(tds), len(vds)) == counts() and tds.classes == vds.classes == ['cats', 'dogs']
    root = root_of(tds)
    assert {p.name for p in root.iterdir()} >= {'train', 'valid', 'sample', 'test1', 'models'}
    assert {Path(f).suffix for f, _ in tds.samples + vds.samples} == {'.jpg', '.png'}

@pytest.mark.parametrize('sz', [64, 96])
def test_centre_crops_are_torchvisions_for_every_photo(dogscats, sz):
    "PNG, JPEG, grey and RGBA photos of both orientations: the cache's centre crop is `Resize(sz)` then `CenterCrop(sz)`."
    tds, vds = dogscats
    ref = T.Compose([T.Resize(sz), T.CenterCrop(sz), T.PILToTensor()])
    for ds in (tds, vds):
        c = photo_cache(ds.samples, sz, root_of(ds))
        assert torch.equal(c.crops(range(len(c))), torch.stack([ref(open_image(f)) for f, _ in ds.samples]))
        assert c.y.tolist() == ds.targets
        assert {tuple(s) for s in c.shapes} >= {(sz, int(sz * w / h)) if h <= w else (int(sz * h / w), sz)
                                                 for w, h in [open_image(f).size for f, _ in ds.samples]}

def test_random_crops_reach_both_ends_and_match_torchvisions_crop(dogscats):
    tds, _ = dogscats
    sz, c = 64, photo_cache(tds.samples, 64, root_of(tds))
    for i, (f, _) in enumerate(tds.samples):
        im = TF.resize(open_image(f), sz)
        h, w = c.shapes[i]; n = max(h, w) - sz
        for pos, o in ((0., 0), (0.999999, n), (0.5, int(0.5 * (n + 1)))):
            top, left = (o, 0) if h > w else (0, o)
            assert torch.equal(c.crops([i], [pos])[0], TF.pil_to_tensor(TF.crop(im, top, left, sz, sz))), (f, pos)

def test_crops_are_channels_last_views_of_a_memory_map(dogscats):
    tds, _ = dogscats
    c = photo_cache(tds.samples, 64, root_of(tds))
    assert isinstance(c.photo(0).base, np.memmap) or isinstance(c.photo(0), np.memmap)  # a view of the file, no copy
    x = c.crops([0, 1])
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)

def test_a_later_call_reads_the_file_and_decodes_nothing(dogscats, monkeypatch):
    tds, _ = dogscats
    c1 = photo_cache(tds.samples, 64, root_of(tds))
    monkeypatch.setattr(P, 'decode_photos', lambda *a, **k: pytest.fail('decoded again instead of reading the cache'))
    c2 = photo_cache(tds.samples, 64, root_of(tds))
    assert c2.sha256 == c1.sha256 and torch.equal(c2.crops(range(len(c2))), c1.crops(range(len(c1))))
    assert len(list(photos_dir().glob('*.u8'))) == 1

def test_a_changed_photo_or_size_makes_a_new_cache(dogscats):
    tds, _ = dogscats
    root = root_of(tds)
    c1 = photo_cache(tds.samples, 64, root)
    c2 = photo_cache(tds.samples, 96, root)
    assert c2.pixels != c1.pixels and c2.sz == 96
    f = Path(tds.samples[0][0])
    from dogscats_archive import photo
    photo(320, 200, 99).save(f, format='PNG' if f.suffix == '.png' else 'JPEG')
    c3 = photo_cache(tds.samples, 64, root)
    assert c3.pixels != c1.pixels and tuple(c3.shapes[0]) == (64, 102)

def test_a_pixel_file_cut_short_is_made_again_and_a_damaged_one_fails_verify(dogscats):
    tds, _ = dogscats
    c = photo_cache(tds.samples, 64, root_of(tds))
    c.pixels.write_bytes(c.pixels.read_bytes()[:-7])
    with pytest.warns(UserWarning, match='bytes, expected'): c2 = photo_cache(tds.samples, 64, root_of(tds))
    assert c2.verify().sha256 == c.sha256
    b = bytearray(c2.pixels.read_bytes()); b[5] ^= 1; c2.pixels.write_bytes(bytes(b))
    with pytest.raises(ValueError, match='delete it and its .npz'): photo_cache(tds.samples, 64, root_of(tds)).verify()

def test_workers_decode_the_same_bytes(dogscats):
    tds, _ = dogscats
    a = photo_cache(tds.samples, 64, root_of(tds))
    a.pixels.unlink(); a.pixels.with_suffix('.npz').unlink()
    b = photo_cache(tds.samples, 64, root_of(tds), workers=2)
    assert b.sha256 == a.sha256

def test_crop_batches_cover_every_photo_once_an_epoch_at_uniform_places():
    s = CropBatches(1000, 64, torch.Generator().manual_seed(0))
    e1, e2 = list(s), list(s)
    assert len(e1) == len(s) == 16 and [len(b) for b, _ in e1][-1] == 1000 - 15 * 64
    assert sorted(i for b, _ in e1 for i in b) == list(range(1000)) and e1 != e2
    pos = torch.tensor([p for _, ps in e1 + e2 for p in ps])
    assert 0 <= pos.min() and pos.max() < 1 and abs(pos.mean() - 0.5) < 0.03 and (pos < 0.1).float().mean() > 0.07
    assert e1 == list(CropBatches(1000, 64, torch.Generator().manual_seed(0)))

def test_crop_dl_batches_and_its_generator_is_found_by_checkpoints(dogscats):
    tds, _ = dogscats
    c = photo_cache(tds.samples, 64, root_of(tds))
    g = torch.Generator().manual_seed(3)
    dl = crop_dl(c, 4, g)
    assert loader_generators(dl) == [g]
    batches = list(dl)
    assert [len(x) for x, _ in batches] == [4, 4, 1] and all(x.dtype == torch.uint8 for x, _ in batches)
    order = list(CropBatches(len(c), 4, torch.Generator().manual_seed(3)))
    for (x, y), (idx, pos) in zip(batches, order):
        assert torch.equal(x, c.crops(idx, pos)) and torch.equal(y, c.y[idx])

def test_bad_input_is_named(dogscats):
    tds, _ = dogscats
    with pytest.raises(ValueError, match='sz=0, expected an integer >= 1'): photo_cache(tds.samples, 0, root_of(tds))
    with pytest.raises(ValueError, match='bs=0, expected an integer >= 1'): CropBatches(10, 0)
    bad = root_of(tds)/'train'/'cats'/'broken.jpg'; bad.write_bytes(b'not a photo')
    with pytest.raises(ValueError, match='broken.jpg: cannot read the image'): photo_cache([(bad, 0)], 64, root_of(tds))

def test_slice_dl_hands_out_views_in_order():
    from course_lib.training import Dataset
    x, y = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).view(10, 3, 2, 2), torch.arange(10)
    dl = slice_dl(Dataset(x, y), 4)
    batches = list(dl)
    assert [len(b) for b, _ in batches] == [4, 4, 2] and len(dl) == 3
    assert torch.equal(torch.cat([b for b, _ in batches]), x) and torch.equal(torch.cat([t for _, t in batches]), y)
    if not dl.pin_memory: assert batches[1][0].data_ptr() == x[4:].data_ptr()  # a view: nothing copied
    assert list(Slices(5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
