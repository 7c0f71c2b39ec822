"""What train.py protects: the run folder (refused when it holds a run, --overwrite, one process
at a time, config.yaml only after every start-up check, stale temporaries), resumes with a changed
config (the schedule rebuilt for a new train.max_iters, other changes refused or taken with
--allow-changes and recorded), non-finite gradients (skipped or stopped, never in the weights) and
a failing evaluation (the checkpoint is saved first and the evaluation rerun on resume).

Tiny runs as in test_train (MiT-B0, 16 channels, 32 x 64 crops)."""
import os

import numpy as np
import pytest
import torch

import cluda.optim
import train
from cluda import runs
from cluda.build import build_model, build_uda_step
from cluda.checkpoint import load_checkpoint
from cluda.config import ConfigError, load_experiment
from cluda.errors import is_user_error, UserError
from cluda.uda import StepResult, TrainForward
from test_data_real import make_cityscapes
from test_train import _tensors_equal, read_csv, run, tiny_overrides


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


def test_a_finished_run_is_never_overwritten_without_overwrite(tmp_path):
    run(tmp_path, "--train.max_iters=2")
    out = tmp_path / "run"
    before = _snapshot(out)
    assert {"config.yaml", "log.csv", "eval.csv", "latest.pt", "best.pt"} <= set(before)
    with pytest.raises(ConfigError, match=r"holds a run.*--resume.*--overwrite"):
        run(tmp_path, "--train.max_iters=2", "--optim.lr=0.01")
    assert _snapshot(out) == before  # not one byte changed, config.yaml included

    (out / "notes.txt").write_text("mine")  # not a run output: --overwrite keeps it
    result = train.main(tiny_overrides(tmp_path, "--train.max_iters=3") + ["--overwrite"])
    assert result["iteration"] == 3
    assert [r["iteration"] for r in read_csv(out / "log.csv")] == ["1", "2", "3"]
    assert load_experiment(str(out / "config.yaml")).train.max_iters == 3
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="exclude each other"):
        train.main(tiny_overrides(tmp_path) + ["--overwrite", "--resume"])


def test_a_failed_start_writes_nothing(tmp_path, monkeypatch):
    # a validation file that cannot be read fails the start, before config.yaml or any iteration
    rng = np.random.default_rng(0)
    make_cityscapes(tmp_path / "cs", rng, "val")
    bad = sorted((tmp_path / "cs" / "leftImg8bit" / "val" / "aachen").iterdir())[1]
    bad.write_bytes(b"not a png")
    with pytest.raises(Exception, match=bad.name):
        run(tmp_path, "--data.val.kind=cityscapes", f"--data.val.root={tmp_path / 'cs'}")
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert runs.RunFolder(str(tmp_path / "run"), resume=False, overwrite=False).outputs() == []

    # an evaluation that can never fit in memory is refused at the start, not at its first run
    monkeypatch.setenv("CLUDA_INFERENCE_MEMORY_GIB", "0.001")
    with pytest.raises(UserError, match=r"val\[0\]"):
        run(tmp_path / "m")
    assert not (tmp_path / "m" / "run" / "config.yaml").exists()
    monkeypatch.delenv("CLUDA_INFERENCE_MEMORY_GIB")

    # a resume refused for a changed model leaves the folder as it was, config.yaml included
    run(tmp_path / "b", "--train.max_iters=2")
    before = _snapshot(tmp_path / "b" / "run")
    with pytest.raises(ConfigError, match=r"model\.channels 16 -> 32"):
        train.main(tiny_overrides(tmp_path / "b", "--model.channels=32") + ["--resume"])
    assert _snapshot(tmp_path / "b" / "run") == before


def test_a_second_process_is_refused_while_the_first_trains(tmp_path):
    with runs.RunFolder(str(tmp_path / "run"), resume=False, overwrite=False):
        with pytest.raises(ConfigError, match="another process is training in"):
            run(tmp_path, "--train.max_iters=1")
        assert not (tmp_path / "run" / "config.yaml").exists()
    run(tmp_path, "--train.max_iters=1")  # released: the run starts


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    run(tmp_path, "--train.max_iters=4", "--stop-at=2")
    out = tmp_path / "run"
    dead = out / ".latest.pt.99999999.0123abcd.tmp"  # no such pid
    alive = out / f".latest.pt.{os.getpid()}.0123abcd.tmp"  # a writer that is still running
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"x")
    train.main(tiny_overrides(tmp_path, "--train.max_iters=4") + ["--resume"])
    assert not dead.exists() and alive.exists()


def test_resume_with_a_longer_schedule_rebuilds_it(tmp_path, capsys):
    run(tmp_path, "--train.max_iters=4")
    out = tmp_path / "run"
    result = train.main(tiny_overrides(tmp_path, "--train.max_iters=6") + ["--resume"])
    assert result["iteration"] == 6
    printed = capsys.readouterr().out
    assert "schedule is rebuilt for 6 iterations" in printed and "train.max_iters 4 -> 6" in printed
    rows = read_csv(out / "log.csv")
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    cfg = load_experiment(str(out / "config.yaml"))
    schedule = cluda.optim.WarmupPoly(max_iters=6, warmup_iters=cfg.optim.warmup_iters,
                                warmup_ratio=cfg.optim.warmup_ratio, power=cfg.optim.poly_power)
    for r in rows[4:]:  # iterations 5 and 6 train at the new schedule's lr, not at lr 0
        it = int(r["iteration"]) - 1
        assert float(r["lr"]) == pytest.approx(cfg.optim.lr * schedule(it)) and float(r["lr"]) > 0
    # the folder records what ran: the old config until iteration 4, the new one after
    assert cfg.train.max_iters == 6
    assert load_experiment(str(out / runs.history_name(4))).train.max_iters == 4
    # a schedule shorter than what is done is refused
    with pytest.raises(ConfigError, match="done 6 iterations, more than train.max_iters 5"):
        train.main(tiny_overrides(tmp_path, "--train.max_iters=5") + ["--resume"])
    with pytest.raises(ConfigError, match="--stop-at 6: the run has already done 6"):
        train.main(tiny_overrides(tmp_path, "--train.max_iters=8") + ["--resume", "--stop-at=6"])


def test_resume_with_a_changed_optimiser_is_refused_or_applied(tmp_path):
    run(tmp_path, "--train.max_iters=4", "--stop-at=2")
    out = tmp_path / "run"
    config_before = (out / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"optim\.lr 0\.001 -> 0\.003.*--allow-changes"):
        train.main(tiny_overrides(tmp_path, "--train.max_iters=4", "--optim.lr=0.003") + ["--resume"])
    assert (out / "config.yaml").read_bytes() == config_before
    with pytest.raises(ConfigError, match="applies to a resume"):
        train.main(tiny_overrides(tmp_path, "--optim.lr=0.003") + ["--allow-changes"])

    train.main(tiny_overrides(tmp_path, "--train.max_iters=4", "--optim.lr=0.003",
                              "--optim.weight_decay=0.5") + ["--resume", "--allow-changes"])
    rows = read_csv(out / "log.csv")
    cfg = load_experiment(str(out / "config.yaml"))
    assert cfg.optim.lr == 0.003 and (out / runs.history_name(2)).read_bytes() == config_before
    schedule = cluda.optim.WarmupPoly(max_iters=4, warmup_iters=cfg.optim.warmup_iters,
                                warmup_ratio=cfg.optim.warmup_ratio, power=cfg.optim.poly_power)
    for r in rows:
        it = int(r["iteration"]) - 1
        lr = 0.001 if it < 2 else 0.003  # the new lr from the resumed iteration on
        assert float(r["lr"]) == pytest.approx(lr * schedule(it)), r
    state = load_checkpoint(out / "latest.pt")
    decays = {g["weight_decay"] for g in state["optimizer"]["param_groups"]}
    assert 0.5 in decays and 0.01 not in decays  # the stored optimiser's value is not brought back


def _nan_gradient_step():
    """A step whose loss is finite (0) but whose gradient is NaN: d sqrt(x) / dx at 0 times 0."""
    class Step:
        start_iter = 0

        def target_active(self, it):
            return False

        def __call__(self, net, teacher, src_img, *a, **k):
            logits = net(src_img).logits
            zero = (logits - logits.detach()).pow(2).sum()
            return StepResult({"src.ce": torch.sqrt(zero)}, {})

    return Step()


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_gradients_never_reach_the_weights(tmp_path, policy):
    cfg = load_experiment(None, tiny_overrides(tmp_path, "--uda.enabled=false", "--cl.source=false",
                                               "--cl.mixed=false", "--uda.fd=false",
                                               f"--train.nonfinite={policy}"))
    torch.manual_seed(0)
    student = build_model(cfg)
    optimizer, scheduler = cluda.optim.build_optimizer(cfg, student)
    data = train.build_train_dataset(cfg, length=100)
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    kw = dict(batch=batch, net=TrainForward(student), student=student, teacher=None, imnet=None,
              optimizer=optimizer, scheduler=scheduler, cfg=cfg, device=torch.device("cpu"))
    logs = train.train_step(it=0, step=build_uda_step(cfg), **kw)  # a normal step first (AdamW moments)
    assert logs["skipped"] == 0.0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"non-finite gradients at iteration 1.*stopped") as err:
            train.train_step(it=1, step=_nan_gradient_step(), **kw)
        assert is_user_error(err.value)  # a setting to change: one line from the command line
    else:
        with pytest.warns(RuntimeWarning, match=r"non-finite gradients at iteration 1 .*parameter.*skipped"):
            logs = train.train_step(it=1, step=_nan_gradient_step(), **kw)
        assert logs["skipped"] == 1.0 and logs["loss"] == 0.0
        assert scheduler.last_epoch == 2  # the schedule still follows the iteration count
    assert _tensors_equal(before, student.state_dict())
    assert all(torch.equal(v, optimizer.state_dict()["state"][0][k]) for k, v in moments.items())


def test_a_failing_evaluation_loses_no_training(tmp_path, monkeypatch):
    extra = ["--train.max_iters=4", "--train.eval_interval=2", "--train.checkpoint_interval=2",
             "--uda.start_iter=1"]
    whole = run(tmp_path / "a", *extra)
    evaluate = train.evaluate_model

    def failing(*a, **k):
        raise MemoryError("out of memory in whole-image evaluation")

    monkeypatch.setattr(train, "evaluate_model", failing)
    with pytest.raises(MemoryError):
        run(tmp_path / "b", *extra)
    out = tmp_path / "b" / "run"
    state = load_checkpoint(out / "latest.pt")
    assert state["iteration"] == 2 and state["evaluated"] is False  # saved before the evaluation
    monkeypatch.setattr(train, "evaluate_model", evaluate)
    resumed = train.main(tiny_overrides(tmp_path / "b", *extra) + ["--resume"])
    # the missed evaluation ran first, then training went on exactly as without the failure
    assert [r["iteration"] for r in read_csv(out / "eval.csv")] == ["2", "4"]
    assert _tensors_equal(whole["student"].state_dict(), resumed["student"].state_dict())
    assert read_csv(out / "eval.csv") == read_csv(tmp_path / "a" / "run" / "eval.csv")
    assert load_checkpoint(out / "latest.pt")["evaluated"] is True
