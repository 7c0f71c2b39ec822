"""bench/train_steps.py: the training-step benchmark runs the real loop on the synthetic pair,
records a failure as a row, and reports CLUDA's cost side by side. No timing is asserted."""
import csv
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed by setup.py
    sys.path.insert(0, str(REPO))

from bench import train_steps as ts  # noqa: E402
from cluda.config import load_experiment  # noqa: E402

# Paper configs made small enough for a CPU step: MiT-B0, 64 x 64 crops (HRDA: 32 x 32 detail).
TINY = ("--model.backbone=mit_b0", "--data.crop_size=[64,64]", "--data.batch_size=1",
        "--experiment.device=cpu", "--experiment.threads=1", "--cl.impl=torch",
        "--uda.ignore_top=4", "--uda.ignore_bottom=8", "--model.hrda.hr_crop_size=[32,32]",
        "--model.hrda.hr_slide_size=[32,32]", "--model.hrda.hr_slide_stride=[16,16]")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_rows_and_the_side_by_side_ratio(tmp_path, capsys):
    assert ts.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / ts.CSV_NAME)
    assert [r["case"] for r in rows] == ["demo_tiny", "demo_tiny_no_cl", "eval_demo_tiny"]
    ev = rows.pop()  # the inference case: seconds per image of the config's eval mode
    assert ev["status"] == "ok" and ev["crop"] == "64x128" and "slide" in ev["note"]
    assert float(ev["p20_s"]) <= float(ev["sec_per_it"]) <= float(ev["p80_s"])
    for r in rows:
        assert r["status"] == "ok" and r["crop"] == "64x64" and r["batch"] == "2"
        assert r["iters"] == "4" and r["windows"] == "2"  # log windows of 2 iterations
        assert float(r["p20_s"]) <= float(r["sec_per_it"]) <= float(r["p80_s"])
        assert 0 <= float(r["data_s"]) <= float(r["sec_per_it"])
        assert float(r["first_window_sec_per_it"]) > 0 and float(r["peak_mem_mib"]) > 0
        assert r["device"] and r["git_rev"] and r["mem_kind"] == "peak RSS"
    assert "--cl.source=false" in rows[1]["overrides"]
    md = (tmp_path / ts.MD_NAME).read_text()
    assert "demo_tiny / demo_tiny_no_cl:" in md and "| demo_tiny |" in md
    assert "eval_demo_tiny" in capsys.readouterr().out.splitlines()[-1]
    # A second run appends: two sections, and --report-only rebuilds the Markdown from the CSV.
    assert ts.main(["--quick", "--cases", "demo_tiny", "--out", str(tmp_path)]) == 0
    assert len(_rows(tmp_path / ts.CSV_NAME)) == 4
    (tmp_path / ts.MD_NAME).unlink()
    assert ts.main(["--report-only", "--out", str(tmp_path)]) == 0
    runs = {r["date"] for r in _rows(tmp_path / ts.CSV_NAME)}  # two, unless within one second
    assert (tmp_path / ts.MD_NAME).read_text().count("\n## ") == len(runs)
    # --merge brings another run's rows (a GPU's) in once.
    other = tmp_path / "gpu"
    assert ts.main(["--merge", str(tmp_path / ts.CSV_NAME), "--out", str(other)]) == 0
    assert ts.main(["--merge", str(tmp_path / ts.CSV_NAME), "--out", str(other)]) == 0
    assert len(_rows(other / ts.CSV_NAME)) == 4 and (other / ts.MD_NAME).exists()


def _window(it, loss, mem, skipped=0):
    return {"iteration": str(it), "loss": str(loss), "mem_mib": str(mem), "skipped": str(skipped)}


def test_stability_verdict_names_what_is_wrong():
    calm = [_window(10 * i, 5 - 0.1 * i, 1000 if i < 5 else 1200) for i in range(1, 31)]
    status, note, growth = ts.stability_verdict(calm, settle_iter=50)
    assert status == "ok" and growth == 0 and "->" in note  # growth before iteration 50 is warm-up
    leak = [dict(w, mem_mib=str(1200 + 10 * i)) for i, w in enumerate(calm)]
    status, _, growth = ts.stability_verdict(leak, settle_iter=50)
    assert "memory grows" in status and growth == 10 * 24
    rising = [dict(w, loss=str(1 + 0.1 * i)) for i, w in enumerate(calm)]
    assert "loss not going down" in ts.stability_verdict(rising, settle_iter=50)[0]
    nan = calm[:-1] + [dict(calm[-1], loss="nan")]
    assert "non-finite" in ts.stability_verdict(nan, settle_iter=50)[0]
    skipped = calm[:-1] + [dict(calm[-1], skipped="1")]
    assert "skipped" in ts.stability_verdict(skipped, settle_iter=50)[0]


def test_stability_row_and_step_probe_on_the_cpu(tmp_path):
    assert ts.main(["--quick", "--cases", "demo_tiny_no_cl", "--stability", "4", "--out", str(tmp_path)]) in (0, 1)
    rows = _rows(tmp_path / ts.CSV_NAME)
    assert [r["case"] for r in rows] == ["demo_tiny_no_cl", "stability_demo_tiny"]
    assert rows[1]["iters"] == "4" and rows[1]["status"].startswith(("ok", "unstable"))
    assert "->" in rows[1]["note"]
    # no CUDA: no synchronisation count, and the interpreter compiles nothing
    assert rows[0]["syncs_per_it"] == "" and rows[0]["late_compiles"] == ""
    assert ts.triton_compiled() is None


@pytest.mark.parametrize("name", sorted(ts.CASES))
def test_every_gpu_case_becomes_a_synthetic_run_of_its_config(name, tmp_path):
    config, extra, _ = ts.CASES[name]
    paper = load_experiment(str(REPO / config))
    cfg = load_experiment(str(REPO / config),
                          ts.synthetic_overrides(config, iters=30, log_interval=5, workers=2,
                                                 work_dir=str(tmp_path), name=name) + list(extra))
    h, w = paper.data.crop_size
    for role in (cfg.data.source, cfg.data.target, cfg.data.val):
        assert role.kind == "synthetic" and role.size == [h, 2 * w] and role.scale is None
    assert cfg.data.source.num_samples >= 4 * 30  # enough scenes for every iteration
    assert cfg.model.pretrained is None and not cfg.data.rcs and cfg.train.eval_interval == 0
    # The network, the crop, the batch and the UDA / CL settings stay the paper's.
    assert cfg.model == dataclasses.replace(paper.model, pretrained=None)
    assert (cfg.data.crop_size, cfg.data.batch_size) == (paper.data.crop_size, paper.data.batch_size)
    assert cfg.uda == paper.uda
    assert cfg.cl.feat_size == ([65, 65] if name == "daformer_cluda_65" else paper.cl.feat_size)


def test_hrda_cluda_case_trains_on_synthetic_data(tmp_path):
    base = dict(date="d", device="cpu", git_rev="r", torch="t")
    config, extra, _ = ts.CASES["hrda_cluda"]
    row = ts.run_case("hrda_cluda", config, extra, iters=2, log_interval=1, workers=0,
                      base_row=base, common=TINY)
    assert row["status"] == "ok", row["status"]
    assert row["crop"] == "64x64" and row["windows"] == 2 and float(row["sec_per_it"]) > 0


def test_a_failing_case_is_a_row(tmp_path, capsys):
    base = dict(date="d", device="cpu", git_rev="r", torch="t")
    row = ts.run_case("bad", "configs/demo.yaml", ("--model.backbone=no_such_net",), iters=2,
                      log_interval=1, workers=0, base_row=base, common=ts.QUICK_OVERRIDES)
    assert row["status"].startswith("error: ") and "no_such_net" in row["status"]
    with pytest.raises(SystemExit):
        ts.parse_args(["--cases", "nope"])
    assert "unknown case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ts.parse_args(["--cases", ""])
    assert "nothing to run" in capsys.readouterr().err
    assert ts.parse_args(["--cases", "", "--stability", "5"]).cases == []


def test_sigterm_stops_the_run_and_keeps_what_it_measured(tmp_path, monkeypatch):
    """What gpu_check.sh's time limit does (`timeout` sends SIGTERM): the case in progress ends
    with the windows it logged, the stability verdict is taken on those, the cases after it are
    skipped, and the rows and the Markdown are written."""
    import train

    real_step = train.train_step

    def sigterm_in_step(k):
        """train_step that sends SIGTERM to this process inside its k-th call (after the step's
        work, before its logs reach train.py: that iteration's window is not written)."""
        calls = []

        def step(**kw):
            logs = real_step(**kw)
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), signal.SIGTERM)
            return logs
        return step

    before = signal.getsignal(signal.SIGTERM)
    # In demo_tiny's 3rd step (of 4, log windows of 2 iterations): its first window is kept, the
    # next cases are skipped.
    monkeypatch.setattr(train, "train_step", sigterm_in_step(3))
    code = ts.main(["--quick", "--out", str(tmp_path), "--stability", "12"])
    assert signal.getsignal(signal.SIGTERM) is before  # main restores the handler it replaced
    rows = _rows(tmp_path / ts.CSV_NAME)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("demo_tiny", "stopped (time limit) after 2 of 4 iterations"),
        ("demo_tiny_no_cl", "skipped (time limit)"), ("eval_demo_tiny", "skipped (time limit)"),
        ("stability_demo_tiny", "skipped (time limit)")]
    assert rows[0]["windows"] == "1" and float(rows[0]["sec_per_it"]) > 0
    assert code == 0 and "| demo_tiny |" in (tmp_path / ts.MD_NAME).read_text()

    # The stability run stopped in its 4th step (windows of 1 iteration): a verdict on 3 windows.
    monkeypatch.setattr(train, "train_step", sigterm_in_step(4))
    out = tmp_path / "stability"
    code = ts.main(["--quick", "--cases", "", "--stability", "12", "--out", str(out)])
    [row] = _rows(out / ts.CSV_NAME)
    assert "stopped (time limit) after 3 of 12 iterations" in row["status"], row
    assert row["windows"] == "3" and "so far: loss" in row["note"]
    assert code == (0 if row["status"].startswith("stopped") else 1)


@pytest.mark.slow
def test_gpu_check_train_dry_run(tmp_path):
    """bench/gpu_check.sh --train --dry-run on the CPU: the training cases with the inference case,
    then the stability run, in one call; the training table printed last."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--train", "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    rows = _rows(tmp_path / ts.CSV_NAME)
    assert [r["case"] for r in rows] == ["demo_tiny", "demo_tiny_no_cl", "eval_demo_tiny",
                                         "stability_demo_tiny"], out.stdout[-3000:] + out.stderr[-3000:]
    assert [r["status"] for r in rows[:3]] == ["ok", "ok", "ok"]
    stability = rows[3]
    assert stability["iters"] == "4" and stability["status"].startswith(("ok", "unstable"))
    # An unstable verdict (4 iterations of a tiny demo need not lower the loss) fails the call.
    assert out.returncode == (0 if stability["status"] == "ok" else 1), out.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "train_steps.csv",
                                                          "train_steps.md"]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("env", "train_steps", "stability"):
        assert f"==================== {step}.log" in log
    assert "mode: train" in log and "pytest_gpu.log" not in log
    tail = out.stdout.strip().splitlines()
    assert "training cases: ok; stability run (4 iterations): " in out.stdout
    assert tail[-5].startswith("case") and tail[-1].startswith("stability_demo_tiny")
    both = subprocess.run(["bash", "bench/gpu_check.sh", "--train", "--kernel", "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "pick one" in both.stderr


@pytest.mark.slow
def test_timeout_stops_a_run_with_loader_workers(tmp_path):
    """`timeout` signals the whole process group, data-loader workers included (as gpu_check.sh's
    time limits do on the GPU machine): the run still ends by itself, before the SIGKILL, with a
    "stopped" row. (The loader's iterator may still report its killed workers, ignored, from
    `__del__` on stderr.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = ["timeout", "--signal=TERM", "--kill-after=60", "40", sys.executable, "-m",
           "bench.train_steps", "--quick", "--cases", "", "--stability", "1000", "--workers", "2",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 124, out.stdout[-3000:] + out.stderr[-3000:]  # 137: it had to be killed
    [row] = _rows(tmp_path / ts.CSV_NAME)
    assert row["case"] == "stability_demo_tiny" and row["status"].startswith("stopped (time limit)")
    assert (tmp_path / ts.MD_NAME).exists()
    assert out.stdout.strip().splitlines()[-1].startswith("stability_demo_tiny")
