"""gpu_backup.torch: tensor views of buffers and autograd saved-tensor offload.

Runs on every backend present (host: CPU tensors over emulated device memory; cuda: CUDA
tensors, marked gpu).  Skips with a reason where PyTorch is not installed.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpu_backup as gb

try:
    import torch

    import gpu_backup.torch as gbt
except ImportError:  # the no-torch checks below still run
    torch = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed "
                                 "(pip install 'gpu-backup[torch]'; CI installs a CPU wheel)")


def _run_py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_gpu_backup_does_not_import_torch():
    out = _run_py("import sys, gpu_backup; print('torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gpu_backup_torch_without_torch_says_how_to_get_it():
    out = _run_py("import sys; sys.modules['torch'] = None\n"
                  "try:\n    import gpu_backup.torch\n"
                  "except ImportError as e:\n    print('ImportError:', e)\n")
    assert out.returncode == 0, out.stderr
    assert "gpu_backup.torch needs PyTorch" in out.stdout
    assert "gpu-backup[torch]" in out.stdout


# ----------------------------------------------------------------- fixtures
@pytest.fixture
def tmgr(make_mgr):
    """A manager factory whose backend torch can use (cuda needs torch built with CUDA)."""
    if torch is None:
        pytest.skip("PyTorch is not installed")
    if make_mgr.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False (a CPU-only torch build)")
    return make_mgr


def _assert_empty(mgr: gb.BufferManager) -> None:
    s = mgr.stats()
    assert (s["buffers"], s["device_bytes"], s["store_bytes"]) == (0, 0, 0), s


def _bits(t: "torch.Tensor") -> np.ndarray:
    """The tensor's bytes, for bit-for-bit comparison (NaN payloads and -0.0 included)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().copy() if t.numel() else np.zeros(0, np.uint8)


# ------------------------------------------------------------ tensor views
@needs_torch
def test_tensor_view_is_the_buffers_memory(tmgr):
    mgr = tmgr()
    buf = mgr.alloc(3 * 4096)
    dev = gbt.torch_device(mgr)
    want = torch.arange(3 * 1024, dtype=torch.float32).reshape(3, 1024)
    with gbt.tensor_access(buf, torch.float32, (3, 1024), "w") as t:
        assert (t.dtype, tuple(t.shape), t.device) == (torch.float32, (3, 1024), dev)
        assert t.is_contiguous()
        t.copy_(want.to(dev))
    assert np.array_equal(buf.to_host(), want.numpy().view(np.uint8).ravel())
    buf.evict()
    assert buf.state is gb.Residency.EVICTED
    with gbt.tensor_access(buf, torch.float32, (3, 1024), "rw") as t:   # restored first
        assert torch.equal(t.cpu(), want)
        t.mul_(2)
    assert np.array_equal(buf.to_host(), (want * 2).numpy().view(np.uint8).ravel())
    buf.free()


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64", "bool", "complex64"])
def test_tensor_view_dtypes_and_offset(tmgr, dtype):
    mgr = tmgr()
    dt = getattr(torch, dtype)
    buf = mgr.alloc(10_000)
    raw = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    if dt is torch.bool:
        raw = raw % 2
    with gbt.tensor_access(buf, torch.uint8, 10_000, "w") as t:
        t.copy_(torch.from_numpy(raw).to(t.device))
    buf.evict()
    off = 16
    n = (10_000 - off) // dt.itemsize // 4 * 4
    with gbt.tensor_access(buf, dt, (4, n // 4), "r", offset=off) as t:
        assert tuple(t.shape) == (4, n // 4) and t.dtype == dt
        got = _bits(t)
    assert np.array_equal(got, raw[off:off + n * dt.itemsize])


@needs_torch
def test_tensor_view_is_emptied_after_the_block(tmgr):
    mgr = tmgr()
    buf = mgr.alloc(4096)
    with gbt.tensor_access(buf, torch.int32, 1024, "w") as t:
        t.fill_(5)
        kept = t
    assert tuple(kept.shape) == (0,) and kept.untyped_storage().nbytes() == 0
    assert buf.to_host().view(np.int32).tolist() == [5] * 1024


@needs_torch
def test_tensor_view_bad_input_changes_nothing(tmgr):
    mgr = tmgr()
    buf = mgr.alloc(4096)
    buf.evict()
    with pytest.raises(ValueError, match=r"needs 8,192 B at offset 0, 8,192 B in all; buffer #\d+ "
                                         r"holds 4,096 B"):
        with gbt.tensor_access(buf, torch.float64, (2, 512), "r"):
            pass
    with pytest.raises(ValueError, match=r"offset=4 B is not a multiple of torch.float64's 8 B"):
        with gbt.tensor_access(buf, torch.float64, 8, "r", offset=4):
            pass
    with pytest.raises(ValueError, match="every dimension must be an int >= 0"):
        with gbt.tensor_access(buf, torch.float32, (-1, 4), "r"):
            pass
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        with gbt.tensor_access(buf, np.float32, 4, "r"):
            pass
    with pytest.raises(ValueError, match="mode="):
        with gbt.tensor_access(buf, torch.float32, 4, "x"):
            pass
    assert buf.state is gb.Residency.EVICTED and not buf.pinned
    assert mgr.stats()["restores"] == 0


@needs_torch
def test_tensor_view_host_stream_is_the_calling_thread(make_mgr):
    if make_mgr.device != "host":
        pytest.skip("host backend only")
    mgr = make_mgr()
    buf = mgr.alloc(4096)
    assert gbt.torch_stream(mgr) == (None, None)
    with pytest.raises(ValueError, match="torch's work runs on the calling thread"):
        with gbt.tensor_access(buf, torch.uint8, 16, "w", stream=mgr.backend.new_stream()):
            pass
    # No stream to wait on: the bytes are there as soon as torch's CPU op returns, and an
    # eviction right after the block copies them.
    with gbt.tensor_access(buf, torch.uint8, 4096, "w") as t:
        t.fill_(7)
    buf.evict()
    assert int(buf.to_host().sum()) == 7 * 4096


@needs_torch
@pytest.mark.gpu
def test_tensor_view_torch_stream_is_the_access_stream(tmgr):
    if tmgr.device != "cuda":
        pytest.skip("cuda only")
    mgr = tmgr()
    buf = mgr.alloc(1 << 20)
    side = torch.cuda.Stream(device=gbt.torch_device(mgr))
    with gbt.tensor_access(buf, torch.uint8, 1 << 20, "w", stream=side) as t:
        assert torch.cuda.current_stream(t.device) == side
        torch.cuda._sleep(200_000_000)   # still running when the block ends
        t.fill_(3)
    buf.evict()                          # waits, on the copy stream, for the fill
    assert int(buf.to_host().astype(np.int64).sum()) == 3 * (1 << 20)
    with gbt.tensor_access(buf, torch.uint8, 1 << 20, "r", stream=side) as t:
        total = t.sum(dtype=torch.int64)  # on `side`, after the restore
    side.synchronize()
    assert int(total) == 3 * (1 << 20)
    with gbt.tensor_access(buf, torch.uint8, 16, "r") as t:   # default: torch's current stream
        assert torch.cuda.current_stream(t.device) == torch.cuda.default_stream(t.device)


# --------------------------------------------------------- saved tensors
class _Boom(Exception):
    pass


class _Probe(torch.autograd.Function if torch is not None else object):  # type: ignore[misc]
    """Identity forward; its backward calls ``on_backward`` (to observe or to fail)."""

    on_backward = None

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if _Probe.on_backward is not None:
            _Probe.on_backward()
        return g


class _Net(torch.nn.Module if torch is not None else object):  # type: ignore[misc]
    """Saves tensors of every kind the offload must get right."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(width, width)
        self.l2 = torch.nn.Linear(width, width)
        self.l3 = torch.nn.Linear(width // 2, 8)

    def forward(self, x):
        h = self.l1(x)                          # saves x (a leaf, no grad) and l1.weight.t()
        a = torch.relu(h)                       # saves its result
        t = a.t()                               # a view covering its storage, non-contiguous
        gram = (t @ a) / a.shape[0]             # saves t (strides kept) and a again
        sq = (a * a).sum(1)                     # a saved twice more: one buffer
        half = h[:, : h.shape[1] // 2]          # a view of part of h's storage: left to torch
        e = torch.exp(half)                     # saves its result (owns its storage)
        mixed = half * e                        # saves the partial view and e
        mid = _Probe.apply(a)
        hb = self.l2(mid).to(torch.bfloat16)    # bfloat16, saved twice by hb * hb
        bb = (hb * hb).float()
        hf = a.to(torch.float16)
        f16 = torch.sigmoid(hf).float()         # float16 result saved
        idx = torch.argsort(h.detach(), dim=1)[:, :8].contiguous()   # int64, owns storage
        g = torch.gather(a, 1, idx)             # saves idx
        cond = h > 0                            # bool, saved by where
        w = torch.where(cond, bb, f16)
        out = self.l3(mixed * w[:, : mixed.shape[1]])
        return out.square().mean() + gram.sum() * 1e-3 + sq.mean() + g.mean()


def _train_grads(model, x, *, offload=None, retain=False):
    """Loss and every gradient (parameters and input), from one forward and backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if offload is None:
        loss = model(x)
    else:
        with offload as hooks:
            loss = model(x)
    loss.backward(retain_graph=retain)
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    return loss.detach().clone(), grads, (loss if retain else None)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(_bits(x), _bits(y))


def _net_and_input(dev, width=64, batch=32, seed=0):
    torch.manual_seed(seed)
    model = _Net(width).to(dev)
    x = torch.randn(batch, width, device=dev)
    return model, x


@needs_torch
@pytest.mark.parametrize("limit", [None, 24 << 10], ids=["roomy", "tight"])
def test_offload_gradients_are_identical(tmgr, limit):
    mgr = tmgr(device_limit=limit)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    loss0, grads0, _ = _train_grads(model, x)
    off = gbt.offload_saved_tensors(mgr, min_bytes=1024)
    loss1, grads1, _ = _train_grads(model, x, offload=off)
    assert np.array_equal(_bits(loss0), _bits(loss1))
    _same(grads0, grads1)
    s = mgr.stats()
    if limit is None:
        assert s["evictions"] == 0 and s["restores"] == 0
    else:
        assert s["evictions"] > 0 and s["restores"] > 0, s
        assert s["peak_device_bytes"] <= limit
    _assert_empty(mgr)   # every buffer freed by the end of backward


@needs_torch
def test_offload_counts_what_it_kept_and_left(tmgr):
    mgr = tmgr(device_limit=24 << 10)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    x = x.requires_grad_(True)
    with gbt.offload_saved_tensors(mgr, min_bytes=1024) as hooks:
        loss = model(x)
    after_forward = mgr.stats()
    assert after_forward["buffers"] > 0 and after_forward["evictions"] > 0
    loss.backward()
    s = hooks.stats()
    assert s["packed"] >= 8 and s["packed_bytes"] > 24 << 10
    assert s["shared"] >= 3             # a, saved by relu, t @ a and a * a (twice)
    assert s["left_param"] >= 3         # the Linear weights (views of parameters), x
    assert s["left_view"] >= 1          # h[:, :32]
    assert s["restored"] > 0 and s["unpacked"] == s["packed"] + s["shared"]
    assert s["left_oom"] == 0
    _assert_empty(mgr)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "bool",
                                   "complex64", "uint8"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "permuted"])
def test_pack_unpack_round_trip_keeps_bytes_dtype_and_strides(tmgr, dtype, layout):
    mgr = tmgr()
    dev = gbt.torch_device(mgr)
    dt = getattr(torch, dtype)
    rng = np.random.default_rng(3)
    raw = torch.from_numpy(rng.integers(0, 256, 4 * 6 * 40 * dt.itemsize, dtype=np.uint8))
    if dt is torch.bool:
        raw = raw % 2
    base = raw.view(dt).reshape(4, 6, 40).to(dev)
    t = {"contiguous": base, "transposed": base.transpose(0, 2),
         "permuted": base.permute(1, 2, 0)}[layout]
    hooks = gbt.SavedTensorOffload(mgr, min_bytes=1)
    packed = hooks.pack(t)
    assert hooks.stats()["packed"] == 1
    (buf,) = mgr.buffers()
    buf.evict()
    out = hooks.unpack(packed)
    assert (out.dtype, out.shape, out.stride(), out.device) == (t.dtype, t.shape, t.stride(), dev)
    assert np.array_equal(_bits(out), _bits(t))
    assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert hooks.stats()["restored"] == 1
    assert np.array_equal(_bits(hooks.unpack(packed)), _bits(t))   # again: retain_graph
    del packed
    _assert_empty(mgr)


@needs_torch
def test_tensors_left_to_pytorch(tmgr):
    mgr = tmgr()
    dev = gbt.torch_device(mgr)
    hooks = gbt.SavedTensorOffload(mgr, min_bytes=4096)
    param = torch.nn.Parameter(torch.zeros(64, 64, device=dev))
    big = torch.randn(64, 64, device=dev) * 1.0
    cases = {
        "small": torch.zeros(1023, device=dev),
        "param": param,
        "view": big[:, 1:],                     # part of a storage
        "device": torch.zeros(64, 64, device="meta"),
        "layout": torch.zeros(64, 64, device=dev).to_sparse(),
    }
    for why, t in cases.items():
        before = hooks.stats()[f"left_{why}"]
        p = hooks.pack(t)
        assert hooks.stats()[f"left_{why}"] == before + 1, why
        out = hooks.unpack(p)
        assert out.shape == t.shape and out.device == t.device
        if why in ("small", "param", "view"):   # the same memory, not a copy
            assert out.data_ptr() == t.data_ptr()
    p = hooks.pack(param.t())                   # a view of a parameter: also the module's
    frozen = torch.nn.Parameter(torch.zeros(64, 64, device=dev), requires_grad=False)
    p2 = hooks.pack(frozen)                     # a frozen parameter: still the module's
    assert hooks.stats()["left_param"] == 3
    assert hooks.stats()["packed"] == 0 and mgr.stats()["buffers"] == 0
    del p, p2


@needs_torch
def test_in_place_change_of_a_tensor_left_to_pytorch_raises_as_autograd_does(tmgr):
    mgr = tmgr()
    dev = gbt.torch_device(mgr)
    w = torch.randn(64, device=dev, requires_grad=True)
    b = w * 2                         # small: left to PyTorch
    c = b.sin()
    with torch.no_grad():
        b.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()            # plain autograd
    with gbt.offload_saved_tensors(mgr, min_bytes=1 << 20):
        b = w * 2
        c = b.sin()
    with torch.no_grad():
        b.add_(1)
    with pytest.raises(RuntimeError, match=r"is at version 1; expected version 0 instead \(a saved "
                                           r"tensor that offload_saved_tensors left to PyTorch\)"):
        c.sum().backward()


@needs_torch
def test_retain_graph_keeps_buffers_until_the_graph_goes(tmgr):
    mgr = tmgr(device_limit=24 << 10)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    _, grads0, _ = _train_grads(model, x)
    off = gbt.offload_saved_tensors(mgr, min_bytes=1024)
    _, grads1, loss = _train_grads(model, x, offload=off, retain=True)
    _same(grads0, grads1)
    held = mgr.stats()["buffers"]
    assert held > 0                                    # the graph still holds them
    for retain in (True, False):                       # again, from the buffers
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain)
        _same(grads0[1:], [p.grad for p in model.parameters()])
        assert mgr.stats()["buffers"] == (held if retain else 0)
    _assert_empty(mgr)                                 # loss is alive; its graph let go
    del loss


@needs_torch
def test_buffers_are_freed_during_backward(tmgr):
    mgr = tmgr()
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    seen = []
    _Probe.on_backward = lambda: seen.append(mgr.stats()["buffers"])
    try:
        with gbt.offload_saved_tensors(mgr, min_bytes=1024):
            loss = model(x)
        peak = mgr.stats()["buffers"]
        loss.backward()
    finally:
        _Probe.on_backward = None
    # By the time backward reaches the probe, the nodes after it have run and let go.
    assert seen and 0 < seen[0] < peak
    _assert_empty(mgr)


def _boom():
    raise _Boom("backward fails half-way")


@needs_torch
def test_exception_in_the_middle_of_backward_leaves_no_buffer(tmgr):
    mgr = tmgr(device_limit=24 << 10)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    _Probe.on_backward = _boom
    try:
        with pytest.raises(_Boom):
            with gbt.offload_saved_tensors(mgr, min_bytes=1024):
                loss = model(x)
                assert mgr.stats()["buffers"] > 0
                loss.backward(retain_graph=True)
    finally:
        _Probe.on_backward = None
    _assert_empty(mgr)                 # at once, though the graph is still referenced
    # and the graph says so if it is used again
    with pytest.raises(gb.BufferFreedError, match="was released by offload_saved_tensors"):
        loss.backward()
    del loss
    # and the manager goes on working
    _, grads0, _ = _train_grads(model, x)
    _, grads1, _ = _train_grads(model, x, offload=gbt.offload_saved_tensors(mgr, min_bytes=1024))
    _same(grads0, grads1)
    _assert_empty(mgr)


@needs_torch
def test_exception_in_a_backward_outside_the_block(tmgr):
    mgr = tmgr(device_limit=24 << 10)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    with gbt.offload_saved_tensors(mgr, min_bytes=1024) as hooks:
        loss = model(x)
    _Probe.on_backward = _boom
    try:
        with pytest.raises(_Boom):
            loss.backward()
    finally:
        _Probe.on_backward = None
    del loss
    gc.collect()
    left = mgr.stats()["buffers"]      # PyTorch may keep the nodes that were ready to run
    assert hooks.release() == left
    _assert_empty(mgr)
    assert hooks.release() == 0        # idempotent


@needs_torch
def test_a_tensor_larger_than_the_limit_stays_with_pytorch(tmgr):
    mgr = tmgr(device_limit=4096)
    dev = gbt.torch_device(mgr)
    model, x = _net_and_input(dev)
    loss0, grads0, _ = _train_grads(model, x)
    with gbt.offload_saved_tensors(mgr, min_bytes=1024) as hooks:
        loss1 = model(x.clone().requires_grad_(True))
    model.zero_grad(set_to_none=True)
    loss1.backward()
    assert np.array_equal(_bits(loss0), _bits(loss1))
    _same(grads0[1:], [p.grad for p in model.parameters()])
    assert hooks.stats()["left_oom"] > 0
    _assert_empty(mgr)


@needs_torch
def test_min_bytes_is_checked():
    with gb.BufferManager("host") as mgr:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="min_bytes="):
                gbt.SavedTensorOffload(mgr, min_bytes=bad)


# ------------------------------------------------------------- the example
@needs_torch
def test_offload_example_runs_on_host():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "torch_offload_example.py"),
                          "--device", "host", "--steps", "3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "losses identical bit for bit" in out.stdout
    assert "evictions" in out.stdout


@needs_torch
def test_release_from_a_finalizer_never_waits_for_the_buffer_lock(tmgr):
    """A saved tensor dropped while its buffer's lock is held on this very thread (garbage
    collection inside the manager) is handed to the manager's collector, not waited for."""
    mgr = tmgr()
    dev = gbt.torch_device(mgr)
    hooks = gbt.SavedTensorOffload(mgr, min_bytes=1)
    packed = hooks.pack(torch.ones(1024, device=dev) * 2)
    (buf,) = mgr.buffers()
    with buf._lock:          # as the shrinker holds it while evicting
        del packed, buf      # would deadlock if the finalizer took the lock
    _assert_empty(mgr)       # stats() runs the collector


@needs_torch
def test_bench_torch_rows_on_host():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_torch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = bench_torch.run("host", batch=32, width=64, depth=3, steps=2, warmup=0)
    by = {r["mode"]: r for r in rows}
    assert list(by) == list(bench_torch.MODES)
    for r in rows:
        assert r["backend"] == "host" and r["device"] == "host"
        assert r["same_losses_as_none"] is True and len(r["step_times_s"]) == 2
        assert r["pinned_host_bytes"] == 0 and r["peak_device_bytes"] is None
    assert by["offload"]["evictions"] > 0 and by["offload"]["restores"] > 0
    assert by["offload"]["buffers_peak_bytes"] <= by["offload"]["device_limit"] \
        < by["offload"]["saved_bytes_per_step"]
    assert by["offload_fits"]["evictions"] == 0 and by["offload_fits"]["buffers_peak_bytes"] > 0
    with pytest.raises(ValueError, match="modes must be among"):
        bench_torch.run("host", modes=("nope",))


@needs_torch
def test_saved_bytes_counts_what_autograd_saves():
    a = torch.randn(1000, requires_grad=True)          # float32: 4,000 B
    b = torch.randn(1000, dtype=torch.float64)          # 8,000 B, needs no gradient
    # a * b saves b alone (a's gradient needs it; b needs none); exp saves its float64
    # result; sum saves nothing
    assert gbt.saved_bytes(lambda: (a * b).exp().sum()) == 8000 + 8000
    assert gbt.saved_bytes(lambda: (a * b).exp().sum(), min_bytes=8001) == 0
    assert gbt.saved_bytes(lambda: (a * a).sum()) == 4000 + 4000   # a saved twice
    assert gbt.saved_bytes(lambda: a.sum()) == 0
