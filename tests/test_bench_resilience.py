"""``gpu-backup bench`` never loses a run: failures, skips, interrupts, output paths, the
statistics and the host-side limits.  Host backend, tiny sizes; failures are injected,
never left to timing."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from test_cli import PNG_MAGIC, _strict_json, run_main

import gpu_backup as gb
from gpu_backup.bench import BenchConfig, Repeats, hostlimits, run_bench, write_json
from gpu_backup.bench import runner as rn
from gpu_backup.bench import scenarios as sc
from gpu_backup.bench import stats, uvm

FAST = ["--device", "host", "--repeat", "1", "--budget", "0", "--touches", "4",
        "--no-host-limits"]


def _bench(tmp_path, *extra: str) -> tuple[int, str, str]:
    return run_main(["bench", *FAST, "--json", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "r.png"), *extra])


# ------------------------------------------------------------- failures and skips
def test_a_step_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = sc.first_cycle_times

    def boom(device, page_size, staging, data, repeats):
        if data.size == 1 << 20:
            raise RuntimeError("injected failure at 1M")
        return real(device, page_size, staging, data, repeats)

    monkeypatch.setattr(sc, "first_cycle_times", boom)
    rc, out, _ = _bench(tmp_path, "--sizes", "64K,1M")
    assert rc == 1
    assert "FAILED" in out and "injected failure at 1M" in out
    doc = _strict_json(tmp_path / "r.json")
    assert doc["failures"] == [{"step": "first", "scenarios": ["evict_first", "restore_first"],
                                "size_bytes": 1 << 20, "error_type": "RuntimeError",
                                "message": "injected failure at 1M"}]
    rows = {(r["scenario"], r["size_bytes"]) for r in doc["results"]}
    assert ("evict_first", 64 << 10) in rows and ("evict_first", 1 << 20) not in rows
    # the steps after the failed one ran at the same size
    for name in ("evict_zero", "oversubscribe", "evict", "link_d2h"):
        assert (name, 1 << 20) in rows, name
    assert doc["summary"]["failed_steps"] == 1
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == PNG_MAGIC


def test_json_is_valid_after_every_step(tmp_path):
    path = tmp_path / "live.json"
    seen: list[int] = []

    def on_update(doc):
        write_json(doc, path)
        back = _strict_json(path)              # a complete file every time
        seen.append(len(back["results"]))

    cfg = BenchConfig(device="host", sizes=(64 << 10,), repeat=1, budget_s=0,
                      host_limits=False)
    doc = run_bench(cfg, on_update=on_update)
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == len(doc["results"])
    assert len(seen) >= 6                     # before the first step, then after each
    assert not [p for p in tmp_path.iterdir() if p.name != "live.json"]   # no temp left


def test_interrupt_keeps_what_finished(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sc, "evict_zero_times", interrupt)
    rc, _, err = _bench(tmp_path, "--sizes", "64K")
    assert rc == 130 and "interrupted" in err
    doc = _strict_json(tmp_path / "r.json")
    assert doc["interrupted"] is True
    names = {r["scenario"] for r in doc["results"]}
    assert {"link_d2h", "evict", "evict_first"} <= names and "evict_zero" not in names
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_a_step_that_cannot_fit_is_skipped_with_its_reason(tmp_path, monkeypatch):
    real = rn.step_needs

    def needs(step, size, on_host, staging):
        if step == "oversubscribe":
            return 0, 1 << 60                 # more host memory than any machine has
        return real(step, size, on_host, staging)

    monkeypatch.setattr(rn, "step_needs", needs)
    rc, out, _ = _bench(tmp_path, "--sizes", "1M")
    assert rc == 0, out
    doc = _strict_json(tmp_path / "r.json")
    skip = [s for s in doc["skipped"] if s["step"] == "oversubscribe"]
    assert len(skip) == 1 and skip[0]["size_bytes"] == 1 << 20
    assert f"needs about {1 << 60:,} B of host memory" in skip[0]["reason"]
    assert not any(r["scenario"] == "oversubscribe" for r in doc["results"])
    assert any(r["scenario"] == "evict" for r in doc["results"])
    assert "oversubscribe (oversubscribe) at 1M: needs about" in out


def test_step_needs_cover_every_step():
    st = gb.Staging()
    for step in rn.STEPS:
        dev, host = rn.step_needs(step, 1 << 20, False, st)
        dev_h, host_h = rn.step_needs(step, 1 << 20, True, st)
        assert dev > 0 and host > 1 << 20 and host_h == host + dev   # emulated device: RAM


# ---------------------------------------------------------------- output paths
def test_json_to_stdout_is_pure_json(tmp_path):
    rc, out, err = run_main(["bench", *FAST, "--sizes", "64K", "--json", "-",
                             "--plot", str(tmp_path / "r.png")])
    assert rc == 0, err
    doc = json.loads(out)                     # nothing else on stdout
    assert doc["backend"] == "host" and doc["results"]
    assert "HOST BACKEND" in err and "evict" in err    # the table went to stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_a_directory_is_an_error_before_any_work(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(rn, "run_bench", never)
    monkeypatch.setattr("gpu_backup.bench.run_bench", never)
    rc, _, err = run_main(["bench", *FAST, "--json", str(tmp_path)])
    assert rc == 2 and "is a directory" in err
    rc, _, err = run_main(["bench", *FAST, "--json", str(tmp_path / "r.json"),
                           "--plot", str(tmp_path)])
    assert rc == 2 and "is a directory" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ statistics
def test_repeats_stop_when_the_median_is_stable():
    r = Repeats(3, 12, budget_s=60)
    times = [1.0] * 3
    assert list(r.cycles(times)) == []                      # stable at the minimum
    assert r.stop_reason(times) == "stable"
    noisy = [1.0, 3.0, 1.0]
    seen = []
    for n in r.cycles(noisy):
        seen.append(n)
        noisy.append(2.0 if n % 2 else 1.0)
    assert 3 < len(noisy) <= 12 and r.stop_reason(noisy) in ("stable", "max")


def test_repeats_stop_at_max_and_at_budget():
    grow = Repeats(2, 5, budget_s=60)
    times = [1.0, 10.0]
    for n in grow.cycles(times):
        times.append(10.0 ** n)              # the median keeps moving: never stable
    assert len(times) == 5 and grow.stop_reason(times) == "max"
    spent = Repeats(2, 100, budget_s=0)
    times = [1.0, 10.0]
    assert list(spent.cycles(times)) == [] and spent.stop_reason(times) == "budget"
    assert Repeats(4).stop_reason([1.0] * 4) == "fixed"
    assert Repeats(3, 9).scaled(10) == Repeats(30, 90)
    assert Repeats(30, 90).capped(3) == Repeats(3, 3)
    with pytest.raises(ValueError, match="max_n=1 must be >= min_n=2"):
        Repeats(2, 1)


def test_spread_quartiles_and_the_wide_flag():
    s = stats.spread([1e-6, 2e-6, 3e-6, 4e-6, 5e-6])
    assert (s["min_us"], s["p50_us"], s["max_us"]) == pytest.approx((1, 3, 5))
    assert s["iqr_us"] == pytest.approx(2.0) and s["spread"] == "wide"   # 2 > 0.25 * 3
    s = stats.spread([1e-6, 1.01e-6, 1.02e-6, 1.0e-6, 1.01e-6])
    assert s["spread"] == "ok"
    s = stats.spread([1e-6, 3e-6])                # below 5 repeats: range vs median
    assert s["iqr_us"] is None and s["spread"] == "ok"
    assert stats.spread([1e-6, 5e-6])["spread"] == "wide"


def test_record_separates_copies_from_effective():
    times = [1e-3] * 5
    copy = sc.record("evict", 1 << 20, times, link_gbps=2.0, direction="d2h")
    eff = sc.record("evict_clean", 1 << 20, times, link_gbps=2.0, direction="d2h",
                    kind=sc.EFFECTIVE)
    gbps = (1 << 20) / 1e-3 / 1e9
    assert copy["ratio_to_link"] == pytest.approx(gbps / 2) and copy["effective_ratio"] is None
    assert eff["effective_ratio"] == pytest.approx(gbps / 2) and eff["ratio_to_link"] is None
    assert copy["gbps_min"] == copy["gbps"] == copy["gbps_max"] == pytest.approx(gbps)


# ------------------------------------------------------------------ host limits
def test_host_limits_and_what_bounds_each_operation():
    lim = hostlimits.measure(1 << 20, threads=2, repeats=1)
    for key in ("write_1", "write_n", "write_cpus", "read_1", "read_n", "read_cpus",
                "first_touch"):
        assert lim[key] > 0, key
    assert lim["threads"] == 2 and lim["bytes"] == 1 << 20
    fake = dict(lim, write_n=10.0, read_n=40.0, first_touch=2.0)
    b = hostlimits.bounds(fake, 20.0, 20.0)
    assert b["evict"]["bound_by"] == "host" and b["evict"]["bound_gbps"] == 10.0
    assert b["restore"]["bound_by"] == "link" and b["restore"]["bound_gbps"] == 20.0
    assert b["evict_first"]["bound_gbps"] == 2.0 and "first touch" in b["evict_first"]["what"]


def test_info_reports_host_limits():
    rc, out, _ = run_main(["info", "--device", "host", "--json"])
    assert rc == 0
    lim = json.loads(out)["host_limits"]
    assert lim["write_n"] > 0 and lim["first_touch"] > 0
    rc, out, _ = run_main(["info", "--device", "host"])
    assert rc == 0 and "host copy limits" in out and "first touch" in out
    rc, out, _ = run_main(["info", "--device", "host", "--json", "--no-host-limits"])
    assert "host_limits" not in json.loads(out)


# ------------------------------------------------------------------- uvm, no GPU
def _fake_runtime(calls: list) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")

    class Loc:
        type = None
        id = None

    rt.cudaMemLocation = Loc
    rt.cudaMemLocationType = types.SimpleNamespace(cudaMemLocationTypeHost="HOST")
    rt.cudaCpuDeviceId = -1

    def prefetch(*args):
        calls.append(args)
        return (0,)

    rt.cudaMemPrefetchAsync = prefetch
    return rt


@pytest.mark.parametrize("major", [12, 13])
def test_cpu_prefetch_uses_the_signature_of_the_installed_bindings(monkeypatch, major):
    calls: list = []
    rt = _fake_runtime(calls)
    pkg = types.ModuleType("cuda.bindings")
    pkg.runtime = rt
    monkeypatch.setitem(sys.modules, "cuda.bindings", pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    monkeypatch.setattr(uvm, "dist_version",
                        lambda *names: f"{major}.0.0" if "cuda-bindings" in names else None)
    fn = uvm.cpu_prefetcher()
    assert callable(fn)
    fn(0x1000, 4096, 77)
    (args,) = calls
    if major >= 13:      # cudaMemPrefetchAsync(ptr, n, cudaMemLocation(host), flags, stream)
        ptr, n, loc, flags, stream = args
        assert (loc.type, loc.id, flags) == ("HOST", 0, 0)
    else:                # cudaMemPrefetchAsync(ptr, n, cudaCpuDeviceId, stream)
        ptr, n, dev, stream = args
        assert dev == -1
    assert (ptr, n, stream) == (0x1000, 4096, 77)


def test_uvm_is_skipped_on_host_with_a_reason():
    with gb.BufferManager("host") as mgr:
        why = uvm.uvm_unusable(mgr.backend, 1 << 20)
    assert why and "CUDA GPU" in why
    assert uvm.uvm_margin(80 << 30) == 8 << 30 and uvm.uvm_margin(4 << 30) == 1 << 30


# ------------------------------------------------------------------ OOM message
def test_oom_names_the_store_when_it_cannot_take_the_pages():
    with gb.ShmemStore(capacity=64 << 10) as store, \
            gb.BufferManager("host", device_limit=256 << 10, store=store) as mgr:
        bufs = [mgr.alloc(128 << 10) for _ in range(2)]
        for i, b in enumerate(bufs):
            with b.access("w") as arr:
                arr[:] = i + 1
        with pytest.raises(gb.OutOfDeviceMemory) as ei:
            mgr.alloc(128 << 10)
        msg = str(ei.value)
        assert "the store cannot take the evictions" in msg
        assert "bytes_avail 65,536 B of capacity 65,536 B" in msg
        assert "host MemAvailable" in msg and "reclaimable" not in msg
        for i, b in enumerate(bufs):          # nothing was lost on the way
            np.testing.assert_array_equal(b.to_host(), np.full(128 << 10, i + 1, np.uint8))


def test_oom_without_store_trouble_keeps_the_device_story():
    with gb.BufferManager("host", device_limit=128 << 10) as mgr:
        a = mgr.alloc(128 << 10)
        with a.access("w"):
            with pytest.raises(gb.OutOfDeviceMemory) as ei:
                mgr.alloc(128 << 10)
    msg = str(ei.value)
    assert "reclaimable 0 B" in msg and "store cannot" not in msg


def test_swap_scenario_swaps_every_miss_and_keeps_the_bytes():
    """The bench's swap rows: every timed miss is served by a swap when it is on, none when
    it is off, and the series timings alternate with the swaps (bytes checked inside)."""
    import numpy as np

    import gpu_backup as gb
    from gpu_backup.bench import scenarios as sc

    data = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    staging = gb.Staging(slots=2, slot_bytes=256 << 10, threads=1)
    series: list[float] = []
    times, swaps = sc.swap_times("host", gb.PAGE_SIZE, staging, data, 3, swap=True,
                                 series=series)
    assert len(times) == len(series) >= 3 and swaps == len(times)
    times, swaps = sc.swap_times("host", gb.PAGE_SIZE, staging, data, 3, swap=False)
    assert len(times) >= 3 and swaps == 0
