"""The memory-mapped uint8 image cache: same pixels as decoding, keyed on its inputs, rebuilt on change."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from mlip_core.data.fixture_trees import truncate, write_dicom, write_jpg, write_png

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


def _many(tmp_path, n=14):
    """``n`` small JPEGs, the fourth truncated and the ninth missing: skips inside finished and redone chunks."""
    paths = [write_jpg(tmp_path / "img" / f"{i:03d}.jpg", seed=i, h=40, w=32) for i in range(n)]
    truncate(paths[3], keep=0.3)
    os.unlink(paths[8])
    return [str(p) for p in paths]


def _files_of(directory):
    return {name: (directory / name).read_bytes() for name in ("images.u8", "index.json")}


def test_cache_bytes_are_the_same_for_any_number_of_workers(tmp_path):
    paths = _many(tmp_path)
    built = {w: ImageCache(tmp_path / f"w{w}", paths, 24, num_workers=w) for w in (0, 1, 2)}
    assert built[2].valid.sum() == len(paths) - 2 and built[2].skips.counts() == {"undecodable image": 2}
    assert _files_of(tmp_path / "w1") == _files_of(tmp_path / "w0") == _files_of(tmp_path / "w2")


class _Interrupt(RuntimeError):
    pass


def _counting_decoder(monkeypatch, fail_at=None):
    """Replace the cache's decoder (in this process) by one that counts its calls and raises at call ``fail_at``."""
    import mlip_core.data.cache as cache_module

    calls = []

    def decode(path, size, mode="pad"):
        calls.append(path)
        if fail_at is not None and len(calls) == fail_at:
            raise _Interrupt("killed")
        return load_uint8(path, size, mode=mode)

    monkeypatch.setattr(cache_module, "load_uint8", decode)
    return calls


def test_an_interrupted_build_resumes_from_its_finished_chunks_and_ends_bitwise_equal(tmp_path, monkeypatch):
    import mlip_core.data.cache as cache_module

    paths = _many(tmp_path)
    monkeypatch.setattr(cache_module, "chunk_size", lambda n: 3)  # chunks [0,3) [3,6) [6,9) ...
    whole = ImageCache(tmp_path / "whole", paths, 24)
    calls = _counting_decoder(monkeypatch, fail_at=8)  # dies inside the third chunk
    with pytest.raises(_Interrupt):
        ImageCache(tmp_path / "c", paths, 24)
    assert not (tmp_path / "c" / "index.json").exists()
    done = sorted(p.name for p in (tmp_path / "c" / ".partial" / "done").iterdir())
    assert done == ["0000000000.json", "0000000003.json"]
    calls = _counting_decoder(monkeypatch)
    resumed = ImageCache(tmp_path / "c", paths, 24)
    assert resumed.rebuilt and resumed.resumed == 6
    assert calls == paths[6:]  # the finished chunks were not decoded again; the interrupted one was
    assert _files_of(tmp_path / "c") == _files_of(tmp_path / "whole")
    assert resumed.skips.counts() == whole.skips.counts() == {"undecodable image": 2}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["build.lock", "images.u8", "index.json"]
    assert not ImageCache(tmp_path / "c", paths, 24).rebuilt


def test_a_build_interrupted_in_process_is_resumed_by_workers(tmp_path, monkeypatch):
    import mlip_core.data.cache as cache_module

    paths = _many(tmp_path)
    monkeypatch.setattr(cache_module, "chunk_size", lambda n: 3)
    whole = ImageCache(tmp_path / "whole", paths, 24)
    _counting_decoder(monkeypatch, fail_at=5)
    with pytest.raises(_Interrupt):
        ImageCache(tmp_path / "c", paths, 24)
    monkeypatch.setattr(cache_module, "load_uint8", load_uint8)
    resumed = ImageCache(tmp_path / "c", paths, 24, num_workers=2)
    assert resumed.resumed == 3
    assert _files_of(tmp_path / "c") == _files_of(tmp_path / "whole") and len(whole) == len(resumed)


def test_a_partial_build_of_other_inputs_or_with_a_torn_record_is_not_trusted(tmp_path, monkeypatch):
    import mlip_core.data.cache as cache_module

    paths = _many(tmp_path)
    monkeypatch.setattr(cache_module, "chunk_size", lambda n: 3)
    _counting_decoder(monkeypatch, fail_at=11)
    with pytest.raises(_Interrupt):
        ImageCache(tmp_path / "c", paths, 24)
    (tmp_path / "c" / ".partial" / "done" / "0000000003.json").write_text('{"key": "')  # torn
    calls = _counting_decoder(monkeypatch)
    again = ImageCache(tmp_path / "c", paths, 24)
    assert again.resumed == 6 and calls == paths[3:6] + paths[9:]
    # A partial build for other inputs (here: another size) starts over.
    _counting_decoder(monkeypatch, fail_at=11)
    with pytest.raises(_Interrupt):
        ImageCache(tmp_path / "d", paths, 24)
    calls = _counting_decoder(monkeypatch)
    other = ImageCache(tmp_path / "d", paths, 16)
    assert other.resumed == 0 and calls == paths
    assert np.array_equal(other.array[0], load_uint8(paths[0], 16))


def test_build_progress_is_a_bar_unless_switched_off(tmp_path, capsys):
    paths = _files(tmp_path)
    ImageCache(tmp_path / "quiet", paths, 24, progress=False)
    assert "caching images" not in capsys.readouterr().err
    ImageCache(tmp_path / "loud", paths, 24)
    assert "caching images" in capsys.readouterr().err


def test_a_full_disk_is_an_error_before_decoding_and_no_preallocation_is_no_error(tmp_path, monkeypatch):
    import errno

    paths = _files(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"\.partial/images\.u8: cannot reserve .* free space there or pass another"):
        ImageCache(tmp_path / "c", paths, 24)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    cache = ImageCache(tmp_path / "c", paths, 24)
    assert cache.rebuilt and np.array_equal(cache[2], load_uint8(paths[2], 24))


def test_an_unfinished_build_folder_with_foreign_files_is_refused_untouched(tmp_path):
    from mlip_core.data.cache import ImageCache

    part = tmp_path / ".partial"
    (part / "done").mkdir(parents=True)
    (part / "build.json").write_text("{}")
    (part / "done" / "0000000000.json").write_text("{}")
    (part / "my_notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match=r"\.partial: an unfinished image-cache build folder holding files no "
                                           r"build writes .*my_notes.txt.*nothing was removed"):
        ImageCache._remove_partial(part)
    assert (part / "my_notes.txt").read_text() == "mine" and (part / "build.json").exists()
    (part / "my_notes.txt").unlink()
    ImageCache._remove_partial(part)
    assert not part.exists()
