"""The loss benchmark (study.benchmark): tiny runs of every part, the measuring helpers (study.measure) and the CLI
output."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from scripts.losses import GLOBAL_STRATEGIES, LOCAL_STRATEGIES
from study import benchmark, measure


def _assert_measured(rows, time_keys=("time_ms",), memory_keys=("peak_mib",)):
    for row in rows:
        for key in time_keys:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        for key in memory_keys:
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)


def test_measure_time_is_a_median_of_positive_times_and_respects_the_budget():
    calls = []
    ms, reps = measure.measure_time(lambda: calls.append(torch.randn(64, 64) @ torch.randn(64, 64)), repeats=5,
                                    warmup=2)
    assert ms > 0 and reps == 5 and len(calls) == 7
    _, reps = measure.measure_time(lambda: torch.randn(8), repeats=1000, warmup=0, max_seconds=0.0)
    assert reps == 3  # the budget cuts the repeats, but never below 3


def test_cpu_peak_memory_sees_a_temporary_and_excludes_what_existed_before():
    existing = torch.zeros(4 * 2**20)  # 16 MiB allocated before the call: not counted

    def fn():
        tmp = torch.ones(2**20)  # 4 MiB temporary, freed inside the call
        del tmp
        return existing.sum()

    peak = measure.measure_peak_memory(fn, "cpu")
    assert 4 * 2**20 <= peak < 8 * 2**20


def test_partition_batch_metadata_is_view_major_and_partition_aware():
    meta = benchmark.partition_batch_metadata(8, num_partitions=4, num_views=2)
    assert meta["sample"].tolist() == list(range(8)) * 2
    assert meta["volume"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] * 2
    assert meta["partition"].tolist() == [0, 1, 2, 3] * 4
    lower, upper = meta["partition"] / 4, (meta["partition"] + 1) / 4
    assert bool(((meta["position"] >= lower) & (meta["position"] < upper)).all())


def test_global_benchmark_rows():
    rows = benchmark.bench_global_loss(batch_sizes=(8, 16), repeats=2, warmup=1, quiet=True)
    assert [(r["strategy"], r["images"]) for r in rows] == [(s, n) for n in (8, 16) for s in GLOBAL_STRATEGIES]
    assert [r["volumes"] for r in rows] == [1] * 4 + [2] * 4
    _assert_measured(rows)
    by = {(r["strategy"], r["images"]): r["positive_pairs"] for r in rows}
    assert by[("random", 16)] == 16 and by[("domain", 16)] == 48  # views; + same partition of the other volume
    with pytest.raises(ValueError, match="partitions"):
        benchmark.bench_global_loss(batch_sizes=(12,), quiet=True)


def test_local_benchmark_rows():
    rows = benchmark.bench_local_loss(batch_sizes=(4,), grid_regions=(5,), dense_regions=(4, 16), channels=4,
                                      feature_size=10, repeats=2, warmup=1, quiet=True)
    expected = [(s, m, k) for s in LOCAL_STRATEGIES for m, k in (("grid", 5), ("dense", 4), ("dense", 16))]
    assert [(r["strategy"], r["mode"], r["regions"]) for r in rows] == expected
    assert all(r["images"] == 4 for r in rows)
    _assert_measured(rows)


def test_step_share_rows():
    rows = benchmark.bench_step_share(image_size=32, global_strategies=("domain",),
                                      local_variants=("random/grid/5", "domain/dense/8"), global_volumes=1,
                                      local_volumes=1, repeats=1, warmup=1, loss_repeats=2, quiet=True)
    assert [(r["stage"], r["strategy"], r["mode"], r["regions"]) for r in rows] == [
        ("global", "domain", None, None), ("local", "random", "grid", 5), ("local", "domain", "dense", 8)]
    assert [r["images"] for r in rows] == [8, 8, 8]
    assert rows[0]["loss_input"] == "8x128" and rows[1]["loss_input"] == "8x64x8x8"  # block 3: 1/4 of the size
    _assert_measured(rows, ("step_ms", "loss_ms", "share_pct"), ("step_peak_mib", "loss_peak_mib"))
    for row in rows:
        assert row["share_pct"] == pytest.approx(100 * row["loss_ms"] / row["step_ms"])
        assert row["step_peak_mib"] > 0
    with pytest.raises(ValueError, match="strategy/mode/regions"):
        benchmark.bench_step_share(image_size=32, global_strategies=(), local_variants=("random-grid",), quiet=True)


def test_format_table_aligns_and_shows_missing_values():
    table = benchmark.format_table([{"a": "x", "b": 1.5}, {"a": "long", "b": None}],
                                   [("a", "name", ""), ("b", "value", ".2f")])
    assert table.splitlines() == ["name  value", "----  -----", "x      1.50", "long      -"]


def test_main_prints_tables_and_writes_json_and_csv(tmp_path, capsys):
    kwargs = dict(device="cpu", global_batch_sizes="[8]", local_batch_sizes=[4], grid_regions=[5], dense_regions=[4],
                  feature_size=10, channels=4, global_strategies="random,domain", local_strategies=["random"],
                  local_variants=["random/grid/5"], image_size=32, repeats=1, step_repeats=1, quiet=True)
    # the pipeline part (whole workflows) has its own test: tests/test_benchmark_pipeline.py
    result = benchmark.main(parts="global,local,step", output=str(tmp_path / "bench.json"), **kwargs)
    out = capsys.readouterr().out
    for title in ("GlobalContrastiveLoss", "LocalContrastiveLoss", "Loss share of a pre-training step", "peak MiB"):
        assert title in out
    assert f"torch {torch.__version__}" in out and "threads" in out and "the 10% target" in out
    assert [len(result[k]) for k in ("global_loss", "local_loss", "step_share")] == [2, 2, 3]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and len(saved["step_share"]) == 3

    benchmark.main(parts="global", output=str(tmp_path / "bench.csv"), **kwargs)
    lines = (tmp_path / "bench.csv").read_text().splitlines()
    assert lines[0].startswith("benchmark,") and len(lines) == 3 and lines[1].startswith("global_loss,")
    with pytest.raises(ValueError, match="parts"):
        benchmark.main(parts="nope", **kwargs)


def test_other_process_cpu_load_is_a_percentage():
    monitor = measure.OtherCpuLoad()
    monitor.start()
    sum(i * i for i in range(200_000))
    share = monitor.stop()
    assert share is None or 0.0 <= share <= 100.0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux /proc only")
def test_own_cpu_time_includes_the_children():
    """Data loader workers and subprocesses are ours, not 'other processes': a child's CPU time adds to ours."""
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    before = measure.own_cpu_ticks()
    subprocess.run([sys.executable, "-c", burn], check=True)
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    assert measure.own_cpu_ticks() - before >= 0.4 * ticks_per_s
