"""Tests of the pixel InfoNCE benchmark (bench/bench_pixel_infonce.py, bench/pixel_infonce/,
bench/utils.py): the Cityscapes-like inputs, the measurement helpers, the guards and the target
verdicts in-process; the quick sweep and bench/gpu_check.sh --dry-run end to end in subprocesses
that write to temporary folders (never to the committed bench/results). No timing is asserted,
only that the numbers are sane.
"""
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed by setup.py
    sys.path.insert(0, str(REPO))

from bench import bench_pixel_infonce as cli  # noqa: E402
from bench.pixel_infonce import inputs, providers, report, runner  # noqa: E402
from bench import utils  # noqa: E402
from cluda.data.labels import IGNORE_INDEX, THING_CLASSES  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One torch thread, as the quick sweep uses: with two OpenMP threads on a shared 2-core
    machine every small op stalls whenever another process holds the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(**overrides):
    values = dict(device=CPU, passes=runner.PASSES, warmup=1, reps_time_s=0.0, min_reps=2,
                  max_reps=3, slow_call_s=0.5, max_call_s=30.0, det_max_s=5.0,
                  mem_limit_bytes=4 * 2**30, budget_s=None, interp_max_n=512,
                  start=time.monotonic())
    values.update(overrides)
    return runner.Settings(**values)


BASE_ROW = dict(date="2026-01-01 00:00:00 UTC", device="test CPU", git_rev="abc1234", threads=1,
                torch="t", triton="t")
MATMUL = {"float32": ("fp32", 0.05), "bfloat16": ("bf16", 0.05)}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Inputs


def test_inputs_follow_cityscapes_frequencies_and_groups():
    n = 200_003
    inp = inputs.make_inputs(n, 4, torch.float32, CPU, seed=3)
    assert inp.feats.shape == (n, 4) and inp.feats.dtype == torch.float32 and inp.feats.requires_grad
    assert inp.labels.shape == inp.groups.shape == inp.upstream.shape == (n,)
    ignored = inp.labels == IGNORE_INDEX
    assert abs(ignored.float().mean().item() - inputs.IGNORE_FRACTION) < 0.005
    valid = inp.labels[~ignored]
    freq = torch.bincount(valid, minlength=19).double() / valid.numel()
    expected = inputs.class_probabilities()
    assert torch.allclose(freq, expected, atol=0.004), (freq - expected).abs().max()
    assert abs(expected[0].item() - 0.37) < 0.01  # road dominates, as in Cityscapes
    is_thing = torch.isin(inp.labels, torch.tensor(THING_CLASSES))
    assert torch.equal(inp.groups, is_thing.long())
    assert (inp.feats >= 0).all() and (inp.upstream >= 0).all() and inp.upstream.std() > 0.1
    bf = inputs.make_inputs(1000, 8, torch.bfloat16, CPU)
    assert bf.feats.dtype == torch.bfloat16 and bf.feats.is_leaf


def test_features_cluster_by_class():
    inp = inputs.make_inputs(3001, 128, torch.float32, CPU, seed=1)
    keep = inp.labels != IGNORE_INDEX
    v = torch.nn.functional.normalize(inp.feats.detach()[keep], dim=1)
    labels = inp.labels[keep]
    sim = v @ v.t()
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    within, across = sim[same].mean().item(), sim[labels[:, None] != labels[None, :]].mean().item()
    # Not isotropic noise (which gives ~0 for both): classes form clusters, all similarities > 0.
    assert within > across + 0.2 and across > 0.1, (within, across)


def test_pair_fraction_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 19, (257,), generator=gen)
    labels[torch.rand(257, generator=gen) < 0.2] = IGNORE_INDEX
    groups = inputs.stuff_thing_groups(labels)
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    pairs = valid[:, None] & valid[None, :] & (groups[:, None] == groups[None, :])
    pairs.fill_diagonal_(False)
    assert inputs.pair_fraction(labels, groups) == pytest.approx(pairs.sum().item() / 257 ** 2, rel=1e-12)
    assert inputs.pair_fraction(labels[:0], groups[:0]) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        inputs.make_inputs(0, 4, torch.float32, CPU)


# ---------------------------------------------------------------------------------------------
# Measurement helpers


@pytest.mark.skipif(not utils.cpu_peak_rss_supported(), reason="no peak-RSS reset on this OS")
def test_measure_call_cpu_peak_rss_sees_an_allocation():
    def allocate():
        x = torch.rand(6 * 2**20)  # 24 MiB, every page written
        return x.sum()

    seconds, peak = utils.measure_call(allocate, CPU)
    assert seconds > 0 and 22 * 2**20 <= peak <= 40 * 2**20, peak / 2**20
    _, idle = utils.measure_call(lambda: None, CPU)
    assert idle < 4 * 2**20, idle / 2**20


def test_timing_quantiles_match_numpy():
    samples = np.random.default_rng(0).uniform(0.001, 0.01, size=7)
    t = utils.timing_from_samples(samples, "perf_counter")
    ms = samples * 1e3
    assert t.median_ms == pytest.approx(np.quantile(ms, 0.5))
    assert t.p20_ms == pytest.approx(np.quantile(ms, 0.2))
    assert t.p80_ms == pytest.approx(np.quantile(ms, 0.8))
    assert t.reps == 7 and t.p20_ms <= t.median_ms <= t.p80_ms
    with pytest.raises(ValueError, match="at least one sample"):
        utils.timing_from_samples([], "x")


def test_time_calls_repetitions_and_slow_first_call():
    calls = []
    x = torch.randn(3, requires_grad=True)
    x.grad = torch.ones(3)

    def fn():
        assert x.grad is None  # cleared before every timed call
        calls.append(1)

    t = utils.time_calls(fn, CPU, first_call_s=1e-3, reps_time_s=0.0, min_reps=4, max_reps=9,
                         slow_call_s=0.5, grad_to_none=[x])
    assert len(calls) == 4 and t.reps == 4 and t.timer == "perf_counter"
    calls.clear()
    # reps_time / first call = 5 calls, capped at max_reps = 3.
    utils.time_calls(fn, CPU, first_call_s=0.2, reps_time_s=1.0, min_reps=1, max_reps=3,
                     slow_call_s=0.5, grad_to_none=[x])
    assert len(calls) == 3
    calls.clear()
    # A slow first call counts as one sample: one more call, and its 2 s is in the quantiles.
    t = utils.time_calls(fn, CPU, first_call_s=2.0, reps_time_s=1.0, min_reps=2, max_reps=9,
                         slow_call_s=0.5, grad_to_none=[x])
    assert len(calls) == 1 and t.reps == 2 and t.p80_ms > 1000.0


def test_grads_bitwise_equal_detects_nondeterminism():
    feats = torch.randn(50, 4, requires_grad=True)
    weights = torch.randn(50, 4)

    def deterministic():
        (feats * weights).sum().backward()

    def noisy():
        (feats * (weights + 1e-7 * torch.randn(50, 4))).sum().backward()

    assert runner.grads_bitwise_equal(deterministic, feats)
    assert not runner.grads_bitwise_equal(noisy, feats)


def test_append_rows_refuses_other_columns(tmp_path):
    path = tmp_path / "r.csv"
    utils.append_rows(path, [{"a": 1, "b": None}], ("a", "b"))
    utils.append_rows(path, [{"a": 2, "b": 3}], ("a", "b"))
    assert utils.read_rows(path) == [{"a": "1", "b": ""}, {"a": "2", "b": "3"}]
    with pytest.raises(ValueError, match="has columns"):
        utils.append_rows(path, [{"a": 1}], ("a", "c"))
    with pytest.raises(FileNotFoundError, match="no results file"):
        utils.read_rows(tmp_path / "missing.csv")


def test_git_revision_format(monkeypatch):
    rev = utils.git_revision()
    assert rev == "unknown" or (len(rev.split("+")[0]) >= 7 and rev.split("+")[1:] in ([], ["dirty"]))
    monkeypatch.setenv("CLUDA_GIT_REV", "deadbee")
    assert utils.git_revision() == "deadbee"


def test_matmul_rate_is_positive_and_checks_kind():
    assert 0 < utils.matmul_tflops(CPU, "fp32", size=128) < 100
    with pytest.raises(ValueError, match="kind"):
        utils.matmul_tflops(CPU, "fp8")
    with pytest.raises(ValueError, match="TF32"):
        utils.matmul_tflops(CPU, "tf32")


# ---------------------------------------------------------------------------------------------
# Cells, guards, verdicts


def test_run_cell_measures_every_pass_of_the_torch_path():
    rows = runner.run_cell(runner.Cell("torch", 300, 8, "float32"), _settings(), runner.History(),
                           BASE_ROW, MATMUL)
    assert [r["pass"] for r in rows] == ["fwd", "bwd", "full"]
    r = float(rows[0]["pair_fraction"])
    assert 0.4 < r < 0.9
    for row in rows:
        assert row["status"] == "ok", row
        median, p20, p80 = (float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms"))
        assert 0 < p20 <= median <= p80
        assert row["reps"] >= 2 and float(row["peak_mem_mib"]) >= 0
        flops = runner.PASS_FLOP_FACTOR[row["pass"]] * r * 300 ** 2 * 8
        assert float(row["tflops"]) == pytest.approx(flops / (median * 1e-3) / 1e12, rel=1e-3)
        assert float(row["share_of_matmul"]) == pytest.approx(float(row["tflops"]) / 0.05, rel=1e-3)
    assert rows[2]["deterministic"] == "yes" and rows[0].get("deterministic", "") == ""


def test_guards_record_oom_time_and_budget_without_running():
    cell = runner.Cell("reference", 100_000, 8, "float32")
    rows = runner.run_cell(cell, _settings(mem_limit_bytes=2**30), runner.History(), BASE_ROW, MATMUL)
    predicted = 1.2 * providers.PEAK_BYTES_PER_PAIR["reference"] * 1e10 / 2**30
    assert [r["status"] for r in rows] == [f"OOM (predicted {predicted:.1f} GiB)"] * 3
    assert all("median_ms" not in r for r in rows)  # nothing ran

    history = runner.History()
    history.add(runner.Cell("torch", 1000, 8, "float32"), 1.0)
    slow = runner.Cell("torch", 100_000, 8, "float32")
    assert history.predict(slow) == pytest.approx(1e4)
    rows = runner.run_cell(slow, _settings(), history, BASE_ROW, MATMUL)
    assert {r["status"] for r in rows} == {"skipped (predicted 10000 s per call)"}

    late = _settings(budget_s=10.0, start=time.monotonic() - 11.0)
    rows = runner.run_cell(runner.Cell("torch", 100, 8, "float32"), late, runner.History(),
                           BASE_ROW, MATMUL)
    assert {r["status"] for r in rows} == {"skipped (time budget)"}


def test_run_cell_records_a_failure_as_a_result():
    # bfloat16 features cannot go through Triton's CPU interpreter: the op raises, the row says so.
    rows = runner.run_cell(runner.Cell("triton", 64, 8, "bfloat16"), _settings(), runner.History(),
                           BASE_ROW, MATMUL)
    assert all(r["status"].startswith("error: TypeError") for r in rows), rows[0]["status"]


def _row(provider, n, pass_="full", status="ok", **values):
    row = {k: "" for k in report.COLUMNS}
    row.update(BASE_ROW, provider=provider, n=str(n), c="512", dtype="bfloat16", status=status,
               **{"pass": pass_})
    row.update({k: str(v) for k, v in values.items()})
    return row


def test_targets_verdicts():
    run = [
        _row("triton", 131072, median_ms=100, peak_mem_mib=500, tflops=360, share_of_matmul=0.45,
             deterministic="yes"),
        _row("triton", 131072, "fwd", median_ms=30, peak_mem_mib=600),  # worst pass counts
        _row("triton", 16384, median_ms=2.0, deterministic="yes"),
        _row("reference", 16384, median_ms=12.0),
        _row("compile", 16384, median_ms=3.0),
        _row("triton", 524288, status="OOM"),
    ]
    memory, share, vs_reference, vs_compile, scale, determinism = report.targets(run)
    assert memory[1:] == ("600 MiB", "missed")  # limit 4 x 128 MiB + 64 = 576 MiB
    assert share[1:] == ("45.0 % (360.0 TFLOP/s)", "met")
    assert vs_reference[1:] == ("6.00x", "met") and "reference" in vs_reference[0]
    assert vs_compile[1:] == ("1.50x", "missed") and "compile" in vs_compile[0]
    assert scale[1:] == ("OOM", "missed")
    assert determinism[1:] == ("2 of 2 cells", "met")
    run[0]["deterministic"] = "no"
    assert report.targets(run)[-1][2] == "missed"
    assert report.targets([_row("torch", 4096)]) == []  # no target cell, no section


def test_merge_rows_skips_duplicates_and_rebuilds_reports(tmp_path):
    gpu = [_row("triton", n, median_ms=n / 1000, peak_mem_mib=n / 500, tflops=100,
                share_of_matmul=0.2, deterministic="yes") for n in (16384, 131072)]
    for row in gpu:
        row.update(device="NVIDIA H100 80GB HBM3", date="2026-02-01 00:00:00 UTC")
    cpu = [_row("torch", 4096, median_ms=150, peak_mem_mib=200)]
    utils.append_rows(tmp_path / "gpu.csv", gpu, report.COLUMNS)
    out = tmp_path / "results"
    utils.append_rows(out / report.CSV_NAME, cpu, report.COLUMNS)
    assert report.merge_rows(tmp_path / "gpu.csv", out / report.CSV_NAME) == 2
    assert report.merge_rows(tmp_path / "gpu.csv", out / report.CSV_NAME) == 0  # already there
    assert len(utils.read_rows(out / report.CSV_NAME)) == 3
    newest = report.write_reports(out)
    assert {r["device"] for r in newest} == {"NVIDIA H100 80GB HBM3"}
    md = (out / report.MD_NAME).read_text()
    # Newest run first, with its target table; the CPU run after it, without one.
    assert md.index("NVIDIA H100") < md.index("test CPU") and md.count("| target (issue 3) |") == 1
    assert (out / report.PNG_NAME).stat().st_size > 1000
    utils.append_rows(tmp_path / "other.csv", [{"a": 1}], ("a",))
    with pytest.raises(ValueError, match="columns"):
        report.merge_rows(tmp_path / "other.csv", out / report.CSV_NAME)


def test_cell_priority_puts_the_issue_targets_first():
    cells = [runner.Cell(p, n, c, d) for p in providers.PROVIDERS
             for n in (8450, 16384, 131072, 524288) for c in (256, 512) for d in ("float32", "bfloat16")]
    ordered = sorted(cells, key=runner.cell_priority)
    # The speed and memory targets: every provider at N = 16,384 and triton at 131,072 (C = 512, bf16).
    targets = {runner.Cell(p, 16384, 512, "bfloat16") for p in providers.PROVIDERS}
    assert set(ordered[:5]) == targets | {runner.Cell("triton", 131072, 512, "bfloat16")}
    assert ordered[5] == runner.Cell("triton", 524288, 512, "bfloat16")  # the scale target
    # Then the kernel at the 10 other cells below N = 524,288, before any baseline.
    assert all(c.provider == "triton" and c.n < 524288 for c in ordered[6:16])
    assert ordered[16].provider != "triton"


def test_parse_args_fills_presets_and_rejects_bad_values():
    args = cli.parse_args(["--quick"])
    assert args.n == cli.QUICK_SWEEP["n"] and args.threads == 1
    args = cli.parse_args(["--n", "65_536", "--providers", "torch", "--passes", "full"])
    assert args.n == (65536,) and args.c == cli.FULL_SWEEP["c"] and args.passes == ("full",)
    for bad in (["--providers", "naive"], ["--dtype", "float64"], ["--n", "0"], ["--n", "x"],
                ["--passes", "both"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_command_line_keeps_every_flag(capsys):
    # The flags scripts and notes use (bench/gpu_check.sh, bench/NOTES.md): none may go missing.
    flags = ("--quick", "--out", "--report-only", "--merge", "--device", "--n", "--c", "--dtype",
             "--providers", "--passes", "--warmup", "--reps-time", "--min-reps", "--max-reps",
             "--slow-call-s", "--max-call-s", "--det-max-s", "--no-det", "--budget-s",
             "--max-mem-gib", "--threads", "--interp-max-n", "--variants", "--standin-memory")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert [f for f in flags if f"  {f}" not in text] == []
    for name in ("resident", "streamed", "split", "split_tma", "split_m32"):  # the launch presets
        assert name in text


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_quick_sweep_writes_sane_csv_markdown_and_plot(tmp_path):
    cmd = [sys.executable, "-m", "bench.bench_pixel_infonce", "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _read_csv(tmp_path / "pixel_infonce.csv")
    assert set(report.COLUMNS) <= set(rows[0])
    assert {r["provider"] for r in rows} == {"reference", "torch", "triton"}
    cells = {(r["provider"], int(r["n"])) for r in rows}
    assert cells == {(p, n) for p in ("reference", "torch") for n in (512, 1024, 4096)} | {("triton", 512)}
    for provider, n in cells:
        assert sorted(r["pass"] for r in rows if (r["provider"], int(r["n"])) == (provider, n)) == \
            ["bwd", "full", "fwd"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["device"] and row["date"] and row["git_rev"] and row["matmul_kind"] == "fp32"
        median, p20, p80 = (float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms"))
        assert 0 < p20 <= median <= p80
        assert float(row["tflops"]) > 0 and float(row["peak_mem_mib"]) >= 0
        assert 0.4 < float(row["pair_fraction"]) < 0.9 and row["c"] == "64"
    # The determinism check runs for full passes of at most --det-max-s (2 s), which the larger
    # reference cells can exceed on a loaded CPU.
    checked = [r for r in rows if r["pass"] == "full" and r["provider"] != "triton"
               and float(r["median_ms"]) <= 2000.0]
    assert checked and all(r["deterministic"] == "yes" for r in checked)
    # The reference holds N x N matrices: at N = 4,096 (64 MiB each) it needs far more than at 512.
    peak = {(r["provider"], int(r["n"])): float(r["peak_mem_mib"]) for r in rows if r["pass"] == "full"}
    assert peak[("reference", 4096)] > 100 and peak[("reference", 4096)] > 4 * peak[("reference", 1024)]
    md = (tmp_path / "pixel_infonce.md").read_text()
    assert md.count("\n## ") == 1 and rows[0]["device"] in md and "| provider | N |" in md
    assert md.count("| reference |") == 3 and md.count("| triton |") == 1
    with Image.open(tmp_path / "pixel_infonce.png") as img:
        assert img.size[0] > 300 and img.size[1] > 300
    lines = out.stdout.splitlines()  # the summary table ends the output: header + 7 cells
    assert lines[-8].startswith("provider") and lines[-1].startswith(("reference", "torch", "triton"))

    # A second run appends to the CSV; the Markdown holds both runs, newest first.
    cmd = [sys.executable, "-m", "bench.bench_pixel_infonce", "--n", "256", "--c", "8",
           "--dtype", "float32", "--providers", "torch", "--passes", "full", "--threads", "1",
           "--out", str(tmp_path)]
    time.sleep(1.0)  # runs are keyed by their start second
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows2 = _read_csv(tmp_path / "pixel_infonce.csv")
    assert len(rows2) == len(rows) + 1 and rows2[-1]["n"] == "256" and rows2[-1]["pass"] == "full"
    md = (tmp_path / "pixel_infonce.md").read_text()
    assert md.count("\n## ") == 2 and md.index("| torch | 256 |") < md.index("| reference | 512 |")


@pytest.mark.slow
def test_gpu_check_dry_run_plumbing(tmp_path):
    env = _env()
    env.update(OUT=str(tmp_path), PYTHON=sys.executable,
               GPU_CHECK_TESTS="tests/test_bench_pixel_infonce.py",
               GPU_CHECK_BENCH_ARGS="--n 256 --c 8 --providers torch,triton")
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())  # the device tool returns at most 8
    assert files == ["gpu_check.log", "pixel_infonce.csv", "pixel_infonce.md",
                     "pixel_infonce.png", "train_steps.csv", "train_steps.md"]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("env", "pytest_gpu", "bench", "train_steps"):
        assert f"==================== {step}.log" in log
    assert "torch" in log and "demo_tiny_no_cl" in log
    rows = _read_csv(tmp_path / "pixel_infonce.csv")
    assert {(r["provider"], r["n"]) for r in rows} == {("torch", "256"), ("triton", "256")}
    train = _read_csv(tmp_path / "train_steps.csv")  # the quick cases and the inference case
    assert [(r["case"], r["status"]) for r in train] == [
        ("demo_tiny", "ok"), ("demo_tiny_no_cl", "ok"), ("eval_demo_tiny", "ok")]
    tail = out.stdout.strip().splitlines()
    kernel_table = tail.index(next(line for line in tail if line.startswith("provider")))
    assert tail[kernel_table + 2].startswith("triton")
    assert tail[-4].startswith("case") and tail[-1].startswith("eval_demo_tiny")
    assert "GPU tests: passed" in out.stdout and "training exit code: 0" in out.stdout
    # GPU_CHECK_BUDGET_S=0: the training steps alone.
    only = tmp_path / "train_only"
    env2 = dict(env, OUT=str(only), GPU_CHECK_BUDGET_S="0", GPU_CHECK_TRAIN_ARGS="--cases demo_tiny")
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env2,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in only.iterdir()) == ["gpu_check.log", "train_steps.csv", "train_steps.md"]
    assert "sweep skipped" in out.stdout and "==================== bench.log" not in (only / "gpu_check.log").read_text()
    assert out.stdout.strip().splitlines()[-1].startswith("demo_tiny ")
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow
def test_compile_provider_runs_every_pass():
    # Cold, the first torch.compile takes ~20 s on a 2-core CPU; warm (inductor cache) ~2 s.
    rows = runner.run_cell(runner.Cell("compile", 256, 8, "float32"), _settings(), runner.History(),
                           BASE_ROW, MATMUL)
    for row in rows:  # "bwd" re-runs backward on one graph: needs donated buffers off
        assert row["status"] == "ok", row["status"]
        assert float(row["median_ms"]) > 0 and row["note"].startswith("compile + first call")
    assert rows[-1]["deterministic"] == "yes"


@pytest.mark.gpu
def test_triton_cell_on_gpu_is_deterministic_and_small():
    device = torch.device("cuda")
    settings = _settings(device=device, mem_limit_bytes=0.5 * torch.cuda.mem_get_info()[0])
    rate = utils.matmul_tflops(device, "bf16", size=4096)
    assert rate > 1.0
    rows = runner.run_cell(runner.Cell("triton", 8450, 64, "bfloat16"), settings, runner.History(),
                           BASE_ROW, {"bfloat16": ("bf16", rate)})
    for row in rows:
        assert row["status"] == "ok", row["status"]
        # O(N * C) buffers only (feats are 1 MiB): one 8,450^2 float32 matrix alone would be
        # 272 MiB.
        assert float(row["peak_mem_mib"]) < 32, row
        assert math.isfinite(float(row["tflops"])) and float(row["tflops"]) > 0
    assert rows[-1]["deterministic"] == "yes"
