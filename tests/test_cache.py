"""The memory-mapped uint8 image cache: same pixels as decoding, keyed on its inputs, rebuilt on change."""

from __future__ import annotations

import os
import pickle

import numpy as np
from dataset_fixtures import truncate, write_dicom, write_jpg, write_png

from mlip_core.data.cache import ImageCache
from mlip_core.data.images import load_uint8


def _files(tmp_path, n=4):
    paths = [write_jpg(tmp_path / "img" / f"{i}.jpg", seed=i) for i in range(n - 2)]
    paths.append(write_png(tmp_path / "img" / "p.png", seed=7))
    paths.append(write_dicom(tmp_path / "img" / "d.dcm", photometric="MONOCHROME1"))
    return paths


def test_cache_serves_the_same_pixels_as_decoding(tmp_path):
    paths = _files(tmp_path)
    cache = ImageCache(tmp_path / "c", paths, 24)
    assert cache.rebuilt and cache.valid.all() and len(cache) == len(paths)
    for i, p in enumerate(paths):
        assert np.array_equal(cache[i], load_uint8(p, 24))
    assert cache.array.shape == (len(paths), 24, 24) and cache.array.dtype == np.uint8


def test_cache_is_reused_when_inputs_match_and_rebuilt_when_they_change(tmp_path):
    paths = _files(tmp_path)
    assert ImageCache(tmp_path / "c", paths, 24).rebuilt
    again = ImageCache(tmp_path / "c", paths, 24)
    assert not again.rebuilt
    assert ImageCache(tmp_path / "c", paths, 16).rebuilt  # target size is part of the key
    assert ImageCache(tmp_path / "c", paths, 16, resize_mode="stretch").rebuilt
    # an image replaced on disk (new content and mtime) must not be served stale
    before = ImageCache(tmp_path / "c", paths, 24)[0]
    write_jpg(paths[0], seed=99, h=48, w=40)
    st = os.stat(paths[1])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ImageCache(tmp_path / "c", paths, 24)
    assert changed.rebuilt and not np.array_equal(changed[0], before)
    assert np.array_equal(changed[0], load_uint8(paths[0], 24))
    assert ImageCache(tmp_path / "c", paths[:-1], 24).rebuilt  # a different image list


def test_a_killed_builds_temporary_data_file_is_removed_by_the_next_build(tmp_path):
    paths = _files(tmp_path)
    (tmp_path / "c").mkdir()
    stale = tmp_path / "c" / ".images.u8.k1ll3d.tmp"
    stale.write_bytes(bytes(1000))
    cache = ImageCache(tmp_path / "c", paths, 24)
    assert cache.rebuilt and np.array_equal(cache[0], load_uint8(paths[0], 24))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["build.lock", "images.u8", "index.json"]


def test_undecodable_images_are_counted_skips_not_errors(tmp_path):
    paths = _files(tmp_path)
    truncate(paths[1], keep=0.3)
    missing = tmp_path / "img" / "gone.jpg"
    cache = ImageCache(tmp_path / "c", [*paths, missing], 24)
    assert cache.valid.tolist() == [True, False, True, True, False]
    assert cache.skips.counts() == {"undecodable image": 2}
    assert {s.item for s in cache.skips.skips} == {str(paths[1]), str(missing)}
    reread = ImageCache(tmp_path / "c", [*paths, missing], 24)
    assert not reread.rebuilt and len(reread.skips) == 2  # skips persist with the index


def test_cache_pickles_without_its_memmap_and_builds_in_parallel(tmp_path):
    paths = _files(tmp_path, n=6)
    cache = ImageCache(tmp_path / "c", paths, 24, num_workers=2)
    serial = ImageCache(tmp_path / "s", paths, 24)
    assert np.array_equal(cache.array, serial.array)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._mm is None and np.array_equal(clone[3], cache[3])


def _open_cache(args):
    directory, paths = args
    cache = ImageCache(directory, paths, 24)
    return cache.rebuilt, cache.array.sum(dtype=np.int64).item()


def test_concurrent_openers_build_once_and_agree(tmp_path):
    import multiprocessing as mp

    paths = [str(p) for p in _files(tmp_path, n=8)]
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_open_cache, [(str(tmp_path / "c"), paths)] * 3)
    assert sum(rebuilt for rebuilt, _ in results) == 1  # the others waited and reused it
    assert len({total for _, total in results}) == 1
    assert not ImageCache(tmp_path / "c", paths, 24).rebuilt
