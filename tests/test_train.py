"""train.py on tiny synthetic data: every config family, exact resume, corrupt checkpoints,
--eval-only, the EMA update and the schedule. MiT-B0 with a 16-channel decoder on 32 x 64 crops."""
import csv
import math

import pytest
import torch

import cluda.data.pairs
import cluda.device
import cluda.optim
import train
from cluda.build import build_model, build_uda_step
from cluda.checkpoint import load_checkpoint
from cluda.config import ConfigError, load_experiment
from cluda.teacher import make_teacher
from cluda.uda import StepResult, TrainForward

# Tiny everything; `tiny_overrides(work_dir)` plus a family's switches is a complete run.
TINY = [
    "--experiment.device=cpu",
    "--data.source.size=[32,64]", "--data.source.num_samples=12",
    "--data.target.size=[32,64]", "--data.target.num_samples=12",
    "--data.val.size=[32,64]", "--data.val.num_samples=3",
    "--data.source.scale=null", "--data.target.scale=null", "--data.val.scale=null",
    "--data.crop_size=[32,64]", "--data.rcs_min_pixels=20", "--data.batch_size=2", "--data.workers=0",
    "--model.backbone=mit_b0", "--model.channels=16", "--model.embed_dim=16",
    "--model.aspp_channels=8", "--model.drop_path_rate=0.0", "--model.pretrained=null",
    "--model.hrda.head_channels=8",
    "--uda.start_iter=1", "--uda.ema_alpha=0.99", "--uda.pseudo_threshold=0.06",
    "--uda.ignore_top=2", "--uda.ignore_bottom=4",
    "--cl.impl=torch", "--cl.feat_size=null",
    "--optim.lr=0.001", "--optim.warmup_iters=2",
    "--train.max_iters=4", "--train.log_interval=1", "--train.eval_interval=0",
    "--train.checkpoint_interval=2", "--train.tensorboard=false",
    "--eval.mode=whole", "--eval.protocols=[19]", "--eval.batch_size=3", "--eval.workers=0",
]

NO_CL = ["--cl.source=false", "--cl.mixed=false"]
# MiT needs inputs of 32 px or more, and HRDA's LR view halves the crop: 64 x 64 crops here.
HRDA = ["--model.hrda.enabled=true", "--data.source.size=[64,128]", "--data.target.size=[64,128]",
        "--data.val.size=[64,128]", "--data.crop_size=[64,64]", "--model.hrda.hr_crop_size=[32,32]",
        "--model.hrda.hr_slide_size=[32,32]", "--model.hrda.hr_slide_stride=[16,16]"]
FAMILIES = {
    # name: (overrides, loss terms)
    "source_only": (["--uda.enabled=false", "--uda.fd=false"] + NO_CL, ["src.ce"]),
    "daformer": (["--uda.fd=true"] + NO_CL, ["src.ce", "src.fd", "mix.ce"]),
    "daformer_cluda": (["--uda.fd=false"], ["src.ce", "src.cl", "mix.ce", "mix.cl"]),
    "hrda": (HRDA + ["--uda.fd=true", "--model.hrda.feature_weight_head=false"] + NO_CL,
             ["src.ce", "src.fd", "mix.ce"]),
    "hrda_cluda": (HRDA + ["--uda.fd=false", "--uda.hr_crop=entropy"],
                   ["src.ce", "src.cl", "mix.ce", "mix.cl"]),
}


def tiny_overrides(work_dir, *extra):
    return [f"--experiment.work_dir={work_dir}", "--experiment.name=run"] + TINY + list(extra)


def run(work_dir, *extra):
    """train.main on configs/demo.yaml made tiny; returns its result dict."""
    return train.main(tiny_overrides(work_dir, *extra))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_and_logs_exactly_its_terms(tmp_path, family):
    overrides, terms = FAMILIES[family]
    result = run(tmp_path, *overrides)
    out = tmp_path / "run"
    rows = read_csv(out / "log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    loss_cols = [c for c in rows[0] if c.startswith(("src.", "mix."))]
    assert loss_cols == terms  # switched-off terms are not even columns
    last = rows[-1]  # iteration 4: past the warm-up (uda.start_iter = 1)
    for t in terms:
        v = float(last[t])
        assert math.isfinite(v)
        # FD is 0 until the student leaves its frozen copy, and the tiny crops rarely hold a
        # thing-class cell at stride 32; test_uda checks FD > 0 on crafted labels.
        assert v > 0 or t == "src.fd", (t, v)
    if "mix.ce" in terms:
        assert rows[0]["mix.ce"] == ""  # iteration 1 is the source-only warm-up ...
        assert rows[0]["gamma"] == "" and 0 <= float(last["gamma"]) <= 1  # ... then Gamma is logged
    for r in rows:  # the loader's share of each iteration's wall time
        assert 0 <= float(r["data_sec_per_it"]) <= float(r["sec_per_it"])
    assert float(rows[0]["src.ce"]) != float(last["src.ce"])  # the loss moves
    assert sum(float(r["loss"]) for r in rows[1:]) != 4 * float(rows[0]["loss"])
    # evaluation at the last iteration, files
    evals = read_csv(out / "eval.csv")
    assert [int(r["iteration"]) for r in evals] == [4]
    miou = result["metrics"][19]["mIoU"]
    assert 0 <= miou <= 1 and float(evals[0]["mIoU19"]) == pytest.approx(miou)
    for name in ("config.yaml", "latest.pt", "best.pt", "curves.png", "val_latest.md", "val_best.csv"):
        assert (out / name).is_file(), name
    saved = load_experiment(str(out / "config.yaml"))
    assert saved.train.max_iters == 4 and saved.data.source.num_samples == 12
    state = load_checkpoint(out / "latest.pt")
    assert state["iteration"] == 4 and (state["teacher"] is None) == (family == "source_only")


@pytest.mark.parametrize("family", ["daformer", "daformer_cluda", "hrda", "hrda_cluda"])
def test_family_runs_under_bfloat16_autocast(tmp_path, family, monkeypatch):
    """The GPU's precision on the CPU: train.py autocasts to bfloat16 on CUDA only, so the CPU tests
    above never see bfloat16 activations. Here the training step and the evaluation run under
    CPU bfloat16 autocast: every term stays finite, the contrastive op is handed the bfloat16
    features (the Triton kernel's fast path on a GPU; a float32 cast would make it 14-28x slower)
    and the weights stay float32."""
    import kernels

    monkeypatch.setattr(train, "autocast", lambda cfg, device: torch.autocast("cpu", dtype=torch.bfloat16))
    dtypes = []
    op = kernels.pixel_infonce

    def spy(feats, labels, **kw):
        dtypes.append(feats.dtype)
        return op(feats, labels, **kw)

    monkeypatch.setattr(kernels, "pixel_infonce", spy)
    overrides, terms = FAMILIES[family]
    result = run(tmp_path, *overrides)
    last = read_csv(tmp_path / "run" / "log.csv")[-1]
    for t in terms:
        assert math.isfinite(float(last[t])) and (float(last[t]) > 0 or t == "src.fd"), (t, last[t])
    assert set(dtypes) == ({torch.bfloat16} if "src.cl" in terms else set())
    assert 0 <= result["metrics"][19]["mIoU"] <= 1
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert {v.dtype for v in state["student"].values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("family", ["daformer_cluda", "hrda_cluda"])
def test_triton_op_in_the_training_loop_matches_the_torch_path(tmp_path, family):
    """The GPU's loss path (the fused Triton kernels, under the interpreter here) inside the real
    loop, HRDA's LR + HR call with exclusive pixels and learned weights included: the same loss
    terms as the tiled torch path to float32 rounding."""
    overrides = FAMILIES[family][0] + ["--train.max_iters=2", "--uda.start_iter=1"]
    logs = {}
    for impl in ("torch", "triton"):
        run(tmp_path / impl, *overrides, f"--cl.impl={impl}")
        logs[impl] = read_csv(tmp_path / impl / "run" / "log.csv")
    for a, b in zip(logs["torch"], logs["triton"]):
        for term in ("src.cl", "mix.cl", "src.ce", "mix.ce"):
            if a[term] or b[term]:
                assert float(b[term]) == pytest.approx(float(a[term]), rel=1e-4, abs=1e-6), (term, a, b)
    assert logs["triton"][-1]["mix.cl"] != ""


@pytest.mark.parametrize("deterministic", [False, True])
def test_backend_settings_hold_for_the_run_and_are_restored(tmp_path, monkeypatch, deterministic):
    """experiment.deterministic: cuDNN autotuning (the default) or deterministic algorithms during
    the run, the caller's settings afterwards; a deterministic CPU run trains as the default does."""
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    seen = []
    step = train.train_step

    def spy(**kw):
        seen.append((cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()))
        return step(**kw)

    monkeypatch.setattr(train, "train_step", spy)
    extra = FAMILIES["daformer_cluda"][0] + ["--train.max_iters=2", f"--experiment.deterministic={deterministic}"]
    result = run(tmp_path, *extra)
    assert set(seen) == {(not deterministic, deterministic, deterministic)}
    assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == before
    if deterministic:  # the same weights as the default run: CPU kernels are deterministic anyway
        default = run(tmp_path / "default", *extra[:-1])
        assert _tensors_equal(result["student"].state_dict(), default["student"].state_dict())


def _tensors_equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_stop_is_bitwise_identical(tmp_path):
    extra = ["--train.max_iters=5", "--uda.start_iter=2", "--data.workers=1", "--train.checkpoint_interval=0"]
    whole = run(tmp_path / "a", *extra)
    first = run(tmp_path / "b", *extra, "--stop-at=3")
    assert first["iteration"] == 3 and first["metrics"] == {}
    assert load_checkpoint(tmp_path / "b" / "run" / "latest.pt")["iteration"] == 3
    resumed = run(tmp_path / "b", *extra, "--resume")
    assert _tensors_equal(whole["student"].state_dict(), resumed["student"].state_dict())
    assert _tensors_equal(whole["teacher"].state_dict(), resumed["teacher"].state_dict())
    assert whole["metrics"][19]["mIoU"] == resumed["metrics"][19]["mIoU"]
    # the resumed log continues the stopped one: same iterations, same losses
    a, b = read_csv(tmp_path / "a" / "run" / "log.csv"), read_csv(tmp_path / "b" / "run" / "log.csv")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == ["1", "2", "3", "4", "5"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_self_training_can_continue_a_source_only_checkpoint(tmp_path):
    src_only = FAMILIES["source_only"][0]
    run(tmp_path, *src_only, "--train.max_iters=4", "--stop-at=2")
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["teacher"] is None
    # self-training switched on is a change beyond run control: asked for with --allow-changes
    result = train.main(tiny_overrides(tmp_path, "--train.max_iters=4", "--uda.start_iter=3",
                                       "--uda.fd=false") + ["--resume", "--allow-changes"])
    rows = read_csv(tmp_path / "run" / "log.csv")
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[1]["src.cl"] == "" and rows[2]["mix.ce"] == "" and float(rows[3]["mix.ce"]) > 0
    assert result["teacher"] is not None
    assert not load_experiment(str(tmp_path / "run" / "config.until_2.yaml")).uda.enabled  # what ran
    assert load_experiment(str(tmp_path / "run" / "config.yaml")).uda.enabled


def test_resume_from_a_corrupt_checkpoint_fails_clearly_and_keeps_the_good_one(tmp_path):
    run(tmp_path, "--train.max_iters=2")
    latest = tmp_path / "run" / "latest.pt"
    good = latest.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"broken\.pt.*truncated"):
        train.main(tiny_overrides(tmp_path, "--train.max_iters=4") + ["--resume", str(broken)])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train.main(tiny_overrides(tmp_path) + ["--resume", str(tmp_path / "nope.pt")])
    assert latest.read_bytes() == good
    # a checkpoint of another model is refused with the differing key named
    with pytest.raises(ConfigError, match=r"model\.channels 16 -> 32"):
        train.main(tiny_overrides(tmp_path, "--train.max_iters=4", "--model.channels=32") + ["--resume"])


def test_eval_only_reproduces_the_final_evaluation(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = run(tmp_path, "--train.max_iters=2", "--experiment.threads=1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp_path / "run" / "latest.pt"
    out = train.main(["--eval-only", str(ckpt)])
    assert out["metrics"][19]["mIoU"] == result["metrics"][19]["mIoU"]
    assert f"mIoU {100 * out['metrics'][19]['mIoU']:.2f} (19 classes)" in capsys.readouterr().out
    # the files of python -m cluda.evaluate, under the same names
    for suffix in ("md", "csv", "json"):
        assert (tmp_path / "run" / f"eval_latest.{suffix}").is_file()
    # overrides apply to the stored config: sliding-window inference on the same checkpoint
    out = train.main(["--eval-only", str(ckpt), "--eval.mode=slide", "--eval.crop_size=[32,32]",
                      "--eval.stride=[16,16]"])
    assert 0 <= out["metrics"][19]["mIoU"] <= 1


def test_train_step_updates_the_teacher_by_ema_and_rejects_nan(tmp_path):
    cfg = load_experiment(None, tiny_overrides(tmp_path, "--uda.start_iter=3", "--uda.ema_alpha=0.99",
                                               "--uda.fd=false"))
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    step = build_uda_step(cfg)
    optimizer, scheduler = cluda.optim.build_optimizer(cfg, student)
    data = train.build_train_dataset(cfg, length=100)
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    kw = dict(batch=batch, net=TrainForward(student), student=student, teacher=teacher, imnet=None,
              step=step, optimizer=optimizer, scheduler=scheduler, cfg=cfg, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logs = train.train_step(it=2, **kw)  # warm-up: the teacher is not touched
    assert set(logs) == {"src.ce", "src.cl", "loss", "lr", "skipped"}
    assert _tensors_equal(before, teacher.state_dict())
    # Floating-point state (parameters and BatchNorm statistics): the teacher's pseudo-label
    # pass in batch-statistics mode must not move its running statistics.
    floats = lambda m: {k: v.clone() for k, v in m.state_dict().items() if v.is_floating_point()}
    s0 = floats(student)
    logs = train.train_step(it=3, **kw)  # first self-training iteration: alpha 0, a copy
    assert {"mix.ce", "mix.cl", "gamma", "pasted"} <= set(logs)
    t0 = floats(teacher)
    assert _tensors_equal(t0, s0)
    s1 = floats(student)
    train.train_step(it=4, **kw)  # alpha = min(1 - 1/2, 0.99) = 0.5
    t1 = floats(teacher)
    for k in s1:
        assert torch.allclose(t1[k], 0.5 * t0[k] + 0.5 * s1[k], atol=1e-6), k

    class NaNStep:
        start_iter = 0

        def target_active(self, it):
            return False

        def __call__(self, *a, **k):
            return StepResult({"src.ce": torch.tensor(float("nan"), requires_grad=True)}, {})

    with pytest.warns(RuntimeWarning, match=r"non-finite loss at iteration 7.*src\.ce.*skipped"):
        logs = train.train_step(it=7, **dict(kw, step=NaNStep()))
    assert logs["skipped"] == 1.0
    kw["cfg"].train.nonfinite = "stop"
    with pytest.raises(FloatingPointError, match=r"iteration 7.*src\.ce.*stopped without saving"):
        train.train_step(it=7, **dict(kw, step=NaNStep()))


def test_amp_needs_a_gpu_with_bfloat16(tmp_path, monkeypatch):
    cfg = load_experiment(None, tiny_overrides(tmp_path))
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(ConfigError, match=r"Tesla V100 \(compute capability 7\.0\) lacks.*--train\.amp=false"):
        cluda.device.check_amp(cfg, gpu)
    cluda.device.check_amp(load_experiment(None, tiny_overrides(tmp_path, "--train.amp=false")), gpu)
    cluda.device.check_amp(cfg, torch.device("cpu"))  # the CPU never autocasts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    cluda.device.check_amp(cfg, gpu)


def test_schedule_is_linear_warmup_then_poly():
    f = cluda.optim.WarmupPoly(max_iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0)
    assert f(0) == pytest.approx(1e-6)
    assert f(5) == pytest.approx((1 - 0.05) * (1 - 0.5 * (1 - 1e-6)))
    assert f(10) == pytest.approx(0.9) and f(50) == pytest.approx(0.5) and f(100) == 0.0
    g = cluda.optim.WarmupPoly(max_iters=100, warmup_iters=0, warmup_ratio=1e-6, power=2.0, min_ratio=0.1)
    assert g(0) == 1.0 and g(50) == pytest.approx(0.9 * 0.25 + 0.1) and g(100) == pytest.approx(0.1)


def test_iteration_batches_give_each_rank_its_own_items():
    b = list(cluda.data.pairs.IterationBatches(start=2, stop=4, batch_size=3, rank=1, world=2))
    assert b == [[15, 16, 17], [21, 22, 23]]  # (it * world + rank) * batch + slot
    r0 = list(cluda.data.pairs.IterationBatches(start=0, stop=3, batch_size=2, rank=0, world=2))
    r1 = list(cluda.data.pairs.IterationBatches(start=0, stop=3, batch_size=2, rank=1, world=2))
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_command_line_rejects_unknown_keys_and_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'cl.temprature'.*temperature"):
        train.main(tiny_overrides(tmp_path, "--cl.temprature=0.1"))
    with pytest.raises(SystemExit):
        train.main(["configs/demo.yaml", "stray"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        train.main([str(tmp_path / "missing.yaml")])
    # an override whose value holds a space is an override, not the config path
    args, overrides = train.parse_args(["--eval.stride=[256, 256]", "--resume"])
    assert args.config is None and args.resume == "auto" and overrides == ["--eval.stride=[256, 256]"]
    args, overrides = train.parse_args(["c.yaml", "--eval.stride=[256, 256]", "--stop-at=3"])
    assert args.config == "c.yaml" and args.stop_at == 3 and overrides == ["--eval.stride=[256, 256]"]
