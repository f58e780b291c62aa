"""Page scans: numpy references, zero-page eviction, and (on a GPU) kernel == reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup.buffer import ZERO_PAGE
from gpu_backup.kernels import (
    NVRTC_OPTIONS,
    PageScanner,
    checksums_reference,
    kernel_source,
    zero_pages_reference,
)
from conftest import cuda_unusable_reason, fill, random_bytes

PS = gb.PAGE_SIZE


def test_kernel_source_is_found():
    src = kernel_source("page_scan.cu")
    assert "classify_pages" in src and "checksum_pages" in src
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        kernel_source("nope.cu")


def test_zero_pages_reference(rng):
    data = random_bytes(rng, 4 * PS)
    data[PS:2 * PS] = 0
    data[3 * PS:] = 0
    data[4 * PS - 1] = 1          # last byte of the last page: not zero
    assert zero_pages_reference(data, PS).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="not a whole number"):
        zero_pages_reference(data[:100], PS)


def test_checksum_reference_by_hand():
    page = np.zeros(64, np.uint8)
    page.view(np.uint32)[:3] = [1, 2, 3]
    a, b = 1 + 2 + 3, 1 * 1 + 2 * 2 + 3 * 3
    expect = np.uint64(a) ^ np.uint64((b * 0x9E3779B97F4A7C15) % 2**64)
    assert checksums_reference(page, 64)[0] == expect


def test_checksum_is_order_and_byte_sensitive(rng):
    data = random_bytes(rng, 2 * PS)
    base = checksums_reference(data, PS)
    swapped = data.copy()
    swapped.view(np.uint32)[[0, 1]] = swapped.view(np.uint32)[[1, 0]]
    flipped = data.copy()
    flipped[PS + 17] ^= 0x40
    if data.view(np.uint32)[0] != data.view(np.uint32)[1]:
        assert checksums_reference(swapped, PS)[0] != base[0]
    assert checksums_reference(flipped, PS)[1] != base[1]
    assert checksums_reference(flipped, PS)[0] == base[0]


def test_zero_pages_are_recorded_not_copied(make_mgr, rng):
    # zero runs of any length pay here: a one-page threshold
    mgr = make_mgr(zero_scan=True, staging=gb.Staging(slots=3, slot_bytes=64 << 10, threads=2,
                                                      zero_run_bytes=PS))
    buf = mgr.alloc(10 * PS - 5)
    data = random_bytes(rng, buf.nbytes)
    zero = [1, 2, 5, 8]          # page 9 is partial: its padding is undefined
    for z in zero:
        data[z * PS:(z + 1) * PS] = 0
    fill(buf, data)
    buf.evict()
    table = buf.page_table()
    assert np.flatnonzero(table == ZERO_PAGE).tolist() == zero
    assert (np.delete(table, zero) > 0).all()
    s = mgr.stats()
    assert s["zero_pages"] == 4 and s["bytes_copied_out"] == 6 * PS
    assert mgr.store.bytes_used == 6 * PS
    np.testing.assert_array_equal(buf.to_host(), data)


def test_short_zero_runs_travel_with_their_neighbours(make_mgr, rng):
    """With the default threshold, a short zero run between pages to copy is copied with
    them (skipping it would split the copy); zero runs at the edges are still skipped."""
    mgr = make_mgr(zero_scan=True, staging=gb.Staging(slots=3, slot_bytes=64 << 10, threads=2,
                                                      zero_run_bytes=4 * PS))
    buf = mgr.alloc(24 * PS)
    data = random_bytes(rng, buf.nbytes)
    zero = [0, 1, 5, 6, 10, 11, 12, 13, 14, 22, 23]   # edge, short interior, long interior, edge
    data.reshape(-1, PS)[zero] = 0
    fill(buf, data)
    buf.evict()
    table = buf.page_table()
    skipped = [0, 1, 10, 11, 12, 13, 14, 22, 23]
    assert np.flatnonzero(table == ZERO_PAGE).tolist() == skipped
    assert (np.delete(table, skipped) > 0).all()              # pages 5, 6 were copied
    assert mgr.stats()["bytes_copied_out"] == (24 - len(skipped)) * PS
    np.testing.assert_array_equal(buf.to_host(), data)


def test_all_zero_buffer_costs_no_copy(make_mgr):
    mgr = make_mgr(zero_scan=True)
    buf = mgr.alloc(64 * PS)
    fill(buf, np.zeros(buf.nbytes, np.uint8))
    assert buf.evict() == 64 * PS
    assert mgr.stats()["bytes_copied_out"] == 0 and mgr.store.bytes_used == 0
    with buf.access("rw") as arr:
        assert int(arr.sum()) == 0
    assert mgr.stats()["bytes_copied_in"] == 0


def test_zero_scan_defaults():
    with gb.BufferManager("host") as m:
        assert m.zero_scan is False


@pytest.mark.gpu
def test_gpu_kernels_match_the_references(rng):
    why = cuda_unusable_reason()
    if why:
        pytest.skip(f"no usable GPU: {why}")
    cp = pytest.importorskip("cupy")
    with gb.BufferManager("cuda") as mgr:
        assert mgr.zero_scan is True
        n = 257
        data = random_bytes(rng, n * PS)
        for z in (0, 7, 100, 256):
            data[z * PS:(z + 1) * PS] = 0
        mem = mgr.backend.alloc(n * PS)
        mgr.backend.array(mem, n * PS).set(data)
        scanner = PageScanner(mgr.backend)
        stream = mgr.backend.copy_stream
        cp.cuda.Device().synchronize()
        np.testing.assert_array_equal(scanner.zero_pages(mem, n * PS, PS, stream=stream),
                                      zero_pages_reference(data, PS))
        np.testing.assert_array_equal(scanner.checksums(mem, n * PS, PS, stream=stream),
                                      checksums_reference(data, PS))


KERNELS = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "kernels").glob("*.cu"))


def _nvrtc() -> ctypes.CDLL:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception as e:  # noqa: BLE001 - not installed: the reason is the skip message
        pytest.skip(f"NVRTC is not available ({type(e).__name__}: {e}); "
                    f"install gpu-backup[cuda13] or [cuda12]")


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_with_nvrtc(name):
    """Every kernel source compiles with NVRTC and our options: no GPU is needed, so a
    source that cannot build is caught before a GPU session is spent on it."""
    assert KERNELS, "no kernels/*.cu found"
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source(name).encode(),
                                  name.encode(), 0, None, None) == 0
    opts = [o.encode() for o in (*NVRTC_OPTIONS, "-arch=compute_90")]
    result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert result == 0, f"{name} does not compile with NVRTC:\n{log.value.decode()}"
