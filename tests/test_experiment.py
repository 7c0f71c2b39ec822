"""cluda.config (the schema: overrides, rejection, cross-field checks), cluda.build (the builders)
and cluda.checkpoint (atomic save, clear errors, model rebuilt from the stored config)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cluda.build import (build_dataset, build_model, build_train_dataset, build_uda_step,
                         build_val_dataset)
from cluda.checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from cluda.config import Config, ConfigError, from_dict, load_experiment, to_dict
from cluda.inference import make_predict_fn
from cluda.models import HRDA, Segmentor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--model.backbone=mit_b0", "--model.channels=16", "--model.embed_dim=16",
              "--model.aspp_channels=8", "--model.hrda.head_channels=8"]


def tiny(*extra):
    return load_experiment(None, TINY_MODEL + list(extra))


def test_defaults_are_the_papers_and_round_trip():
    cfg = load_experiment()
    assert (cfg.model.backbone, cfg.model.channels, cfg.optim.lr, cfg.optim.head_lr_mult) == ("mit_b5", 512, 6e-5, 10.0)
    assert (cfg.uda.pseudo_threshold, cfg.uda.ema_alpha, cfg.uda.fd_lambda) == (0.968, 0.999, 0.005)
    assert (cfg.train.max_iters, cfg.optim.warmup_iters, cfg.data.batch_size) == (40000, 1500, 2)
    assert (cfg.cl.pairs, cfg.cl.weighting, cfg.cl.feat_size, cfg.cl.multires) == ("stuff+thing", "anchor", None, "weighted")
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_overrides_and_rejection_list_known_keys():
    cfg = tiny("--cl.temperature=0.1", "--data.crop_size=[64,32]", "--cl.feat_size=[65,65]",
               "--eval.protocols=[16,13]", "--uda.hr_crop=entropy")
    assert cfg.cl.temperature == 0.1 and cfg.data.crop_size == [64, 32] and cfg.cl.feat_size == [65, 65]
    assert cfg.eval.protocols == [16, 13] and cfg.uda.hr_crop == "entropy"
    with pytest.raises(ConfigError, match=r"unknown key 'cl.temprature'; known keys of cl: .*temperature"):
        tiny("--cl.temprature=0.1")
    with pytest.raises(ConfigError, match=r"unknown key 'modle.backbone'; known keys: .*model"):
        tiny("--modle.backbone=mit_b0")
    with pytest.raises(ConfigError, match=r"cl\.pairs: expected one of \['all', 'stuff', 'stuff\+thing'\]"):
        tiny("--cl.pairs=things")
    with pytest.raises(ConfigError, match=r"data\.source\.kind: expected one of"):
        tiny("--data.source.kind=kitti")


@pytest.mark.parametrize("overrides, message", [
    (["--uda.enabled=false"], "cl.mixed needs uda.enabled"),
    (["--data.source.kind=gta"], r"data\.source\.root is required for kind 'gta'"),
    (["--data.source.kind=cityscapes", "--data.source.root=x"], "the source must be labelled"),
    (["--model.hrda.enabled=true", "--model.hrda.hr_crop_size=[1024,1024]"], "must fit in data.crop_size"),
    (["--model.hrda.enabled=true", "--model.hrda.feature_weight_head=false"], "needs model.hrda.feature_weight_head"),
    (["--eval.protocols=[17]"], "eval.protocols must list some of"),
    (["--uda.start_iter=50", "--train.max_iters=10"], "beyond train.max_iters"),
    (["--cl.temperature=0"], r"cl.temperature must be >= 0\.023"),
    (["--cl.temperature=0.005"], r"cl.temperature must be >= 0\.023.*got 0\.005"),
    (["--model.num_classes=16"], "model.num_classes must be 19"),
    (["--experiment.threads=0"], "experiment.threads must be >= 1"),
    (["--cl.triton_variant=fastest"], r"cl\.triton_variant must be null or a preset name: .*known: \['resident', "),
    # checked at start-up, not where first used (an evaluation hours into a run, the optimiser)
    (["--eval.scales=[1.0, -0.5]"], r"eval\.scales must be positive"),
    (["--eval.scales=[0]"], r"eval\.scales must be positive"),
    (["--eval.mode=slide", "--eval.crop_size=[64,64]", "--eval.stride=[65,32]"],
     r"eval\.stride \[65, 32\] must not exceed eval\.crop_size"),
    (["--eval.stride=[0,32]"], r"eval\.stride: expected \[height, width\] of positive ints"),
    (["--model.hrda.enabled=true", "--model.hrda.hr_slide_stride=[600,256]"],
     r"model\.hrda\.hr_slide_stride \[600, 256\] must not exceed"),
    (["--experiment.seed=-1"], r"experiment\.seed must lie in \[0, 2\*\*63\)"),
    (["--experiment.seed=9223372036854775808"], r"experiment\.seed must lie in"),
    (["--optim.betas=[0.9, 1.0]"], r"optim\.betas\[1\] must lie in \[0, 1\)"),
    (["--optim.betas=[-0.1, 0.99]"], r"optim\.betas\[0\] must lie in"),
    (["--optim.min_lr=0.1"], r"optim\.min_lr must be <= optim\.lr"),
    (["--optim.grad_clip=0"], r"optim\.grad_clip must be > 0"),
    (["--data.rcs_temperature=0"], r"data\.rcs_temperature must be > 0"),
    (["--data.rcs_min_crop_ratio=-0.5"], r"data\.rcs_min_crop_ratio must be >= 0.*-0\.5"),
    (["--data.flip_prob=2"], r"data\.flip_prob must lie in"),
    (["--data.cat_max_ratio=0"], r"data\.cat_max_ratio must lie in \(0, 1\]"),
    (["--uda.blur_p=1.5"], r"uda\.blur_p must lie in"),
    (["--model.dropout=1.0"], r"model\.dropout must lie in \[0, 1\)"),
    (["--model.backbone=resnet_101"], r"model\.backbone 'resnet_101' is neither"),
    (["--model.hrda.enabled=true", "--model.hrda.lr_scale=0"], r"model\.hrda\.lr_scale must lie in"),
])
def test_cross_field_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_the_smallest_temperature_is_accepted():
    from cluda.config import MIN_TEMPERATURE

    assert tiny(f"--cl.temperature={MIN_TEMPERATURE}").cl.temperature == MIN_TEMPERATURE


def test_non_finite_values_are_refused(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("cl:\n  weight: .nan\noptim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"cl\.weight, optim\.lr: NaN or infinite"):
        load_experiment(str(path))


def test_triton_variant_reaches_the_op():
    from cluda.build import build_uda_step

    step = build_uda_step(tiny("--cl.triton_variant=split"))
    assert step.contrastive.variant == "split" and "variant='split'" in repr(step.contrastive)
    assert build_uda_step(tiny()).contrastive.variant is None


def test_build_model_segmentor_and_hrda():
    seg = build_model(tiny())
    assert isinstance(seg, Segmentor) and seg.decoder.channels == 16 and seg.num_classes == 19
    h = build_model(tiny("--model.hrda.enabled=true", "--data.crop_size=[64,64]",
                         "--model.hrda.hr_crop_size=[32,32]", "--model.hrda.hr_loss_weight=0.2"))
    assert isinstance(h, HRDA) and h.hr_crop_size == (32, 32) and h.hr_loss_weight == 0.2
    assert h.feature_weight_head is not None
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        build_model(tiny("--model.pretrained=/nowhere/no_such_weights.pth"))


def test_build_datasets_roles_and_sizes():
    cfg = tiny("--data.source.size=[32,64]", "--data.source.num_samples=6",
               "--data.target.size=[32,64]", "--data.target.num_samples=5",
               "--data.val.size=[48,64]", "--data.val.num_samples=7", "--data.val.max_images=3",
               "--data.crop_size=[32,32]", "--data.rcs_min_pixels=10")
    pairs = build_train_dataset(cfg, length=50)
    assert len(pairs) == 50
    item = pairs[11]
    assert item["source"]["img"].shape == (3, 32, 32) and item["target"]["label"].shape == (32, 32)
    assert item["source"]["rcs_class"] >= 0  # rare class sampling on
    assert torch.equal(pairs[11]["source"]["img"], item["source"]["img"])  # item = f(seed, index)
    # source and target training scenes come from different layouts (different scene seeds)
    assert pairs.source.scene_seed != pairs.target.scene_seed and pairs.target.domain == "target"
    val = build_val_dataset(cfg)
    assert len(val) == 3 and val[0]["img"].shape == (3, 48, 64) and val[0]["label"].shape == (48, 64)
    assert val.dataset.split == "val" and val.dataset.domain == "target"
    with pytest.raises(ValueError, match="role must be one of"):
        build_dataset(cfg.data.val, role="test")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_val_dataset(tiny("--data.val.kind=cityscapes", "--data.val.root=/nowhere"))


def _swap_labels(dataset, make):
    """Make `dataset` load `make(label)` in place of each label (images unchanged)."""
    load = dataset.load

    def swapped(i):
        img, label = load(i)
        return img, make(label)
    dataset.load = swapped


def test_target_crops_do_not_read_the_target_labels():
    """A label map of a single class makes mmseg's category-max rule redraw every crop; the
    source's crops show it, the target's must not change (its labels are never used)."""
    cfg = tiny("--data.source.size=[48,96]", "--data.source.num_samples=6",
               "--data.target.size=[48,96]", "--data.target.num_samples=6",
               "--data.crop_size=[32,32]", "--data.rcs=false", "--data.cat_max_ratio=0.75")
    plain, target_swapped, source_swapped = (build_train_dataset(cfg) for _ in range(3))
    _swap_labels(target_swapped.target, np.zeros_like)
    _swap_labels(source_swapped.source, np.zeros_like)
    source_changed = 0
    for i in range(12):
        assert torch.equal(plain[i]["target"]["img"], target_swapped[i]["target"]["img"]), i
        source_changed += not torch.equal(plain[i]["source"]["img"], source_swapped[i]["source"]["img"])
    assert source_changed > 0, "the label swap must change rule-driven crops"
    assert plain.target.transform.cat_max_ratio == 1.0
    assert plain.source.transform.cat_max_ratio == 0.75


def test_target_pseudo_margins_reach_the_sample():
    """Margins (top 2, bottom 5, left 3, right 4) are marked on the 40 x 48 image, then cropped
    (40 x 40, offset x0 in 0..8) and flipped with it: a crop has 3 - x0 invalid columns on the left
    and x0 - 4 on the right (mirrored when flipped), never both."""
    sizes = ["--data.target.size=[40,48]", "--data.target.num_samples=4", "--data.source.size=[40,48]",
             "--data.source.num_samples=4", "--data.rcs=false", "--data.crop_size=[40,40]"]
    pairs = build_train_dataset(tiny(*sizes, "--data.target_pseudo_margins=[2,5,3,4]"))
    possible = {(max(0, 3 - x0), max(0, x0 - 4)) for x0 in range(9)}
    seen = set()
    for i in range(24):
        item = pairs[i]
        assert "pseudo_valid" not in item["source"]
        valid = item["target"]["pseudo_valid"]
        assert valid.shape == (40, 40) and valid.dtype == torch.uint8
        assert (valid[:2] == 0).all() and (valid[-5:] == 0).all()
        row = valid[10].tolist()
        left = next(k for k, v in enumerate(row + [1]) if v)
        right = next(k for k, v in enumerate(row[::-1] + [1]) if v)
        assert sum(row) == 40 - left - right and (valid[2:-5] == valid[10]).all()
        assert (left, right) in possible or (right, left) in possible, (left, right)
        seen.add((left > 0, right > 0))
    assert {(True, False), (False, True), (False, False)} <= seen
    # Without margins: the same draws, no map.
    plain = build_train_dataset(tiny(*sizes))
    assert "pseudo_valid" not in plain[0]["target"]
    assert all(torch.equal(plain[i]["target"]["img"], pairs[i]["target"]["img"]) for i in range(4))
    with pytest.raises(ConfigError, match="target_pseudo_margins"):
        tiny("--data.target_pseudo_margins=[1,2,3]")
    with pytest.raises(ConfigError, match="target_pseudo_margins"):
        tiny("--data.target_pseudo_margins=[1,2,3,-1]")


def test_cl_objective_released_config():
    assert load_experiment().cl.objective == "paper"
    step = build_uda_step(tiny("--cl.objective=released"))
    assert step.contrastive.objective == "released"
    hrda = tiny("--cl.objective=released", "--model.hrda.enabled=true", "--data.crop_size=[64,64]",
                "--model.hrda.hr_crop_size=[32,32]")
    assert hrda.cl.objective == "released" and hrda.cl.multires == "weighted"
    for bad in ("--cl.pairs=all", "--cl.weighting=pair", "--cl.temperature=0.5",
                "--cl.feat_size=[65,65]"):
        with pytest.raises(ConfigError, match=r"cl\.objective 'released' fixes .*got cl\."):
            tiny("--cl.objective=released", bad)
    with pytest.raises(ConfigError, match=r"got cl\.multires='lr'"):
        tiny("--cl.objective=released", "--model.hrda.enabled=true", "--data.crop_size=[64,64]",
             "--model.hrda.hr_crop_size=[32,32]", "--cl.multires=lr")
    # A config written before the key existed loads with the paper's objective.
    data = to_dict(tiny())
    del data["cl"]["objective"], data["data"]["target_pseudo_margins"]
    old = from_dict(Config, data)
    assert old.cl.objective == "paper" and old.data.target_pseudo_margins is None


def test_build_uda_step_follows_the_switches():
    assert build_uda_step(tiny()).term_names() == ["src.ce", "src.fd", "src.cl", "mix.ce", "mix.cl"]
    step = build_uda_step(tiny("--cl.source=false", "--cl.mixed=false", "--uda.fd=false"))
    assert step.term_names() == ["src.ce", "mix.ce"] and step.contrastive is None
    step = build_uda_step(tiny("--uda.enabled=false", "--cl.mixed=false", "--cl.temperature=0.2",
                               "--cl.pairs=all", "--cl.feat_size=[9,9]"))
    assert step.term_names() == ["src.ce", "src.fd", "src.cl"]
    assert (step.contrastive.temperature, step.contrastive.pairs, step.contrastive.feat_size) == (0.2, "all", (9, 9))


def test_make_predict_fn_whole_and_slide():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    x = torch.randn(1, 3, 64, 96)
    whole = make_predict_fn(model, tiny())(x)
    slide = make_predict_fn(model, tiny("--eval.mode=slide", "--eval.crop_size=[64,64]",
                                        "--eval.stride=[32,32]"))(x)
    assert whole.shape == slide.shape == (1, 19, 64, 96)
    assert not torch.allclose(whole, slide)  # different windows, different logits


def _state(cfg, model):
    return {"config": to_dict(cfg), "iteration": 7, "student": model.state_dict(),
            "teacher": None, "extra": [1, 2.5, "x"]}


def test_checkpoint_round_trip_and_model_rebuilt_from_its_config(tmp_path):
    cfg = tiny("--cl.temperature=0.3")
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path / "ck" / "latest.pt"
    save_checkpoint(path, _state(cfg, model))
    assert os.listdir(tmp_path / "ck") == ["latest.pt"]  # no temporary file left behind
    state = load_checkpoint(path)
    assert state["iteration"] == 7 and state["extra"] == [1, 2.5, "x"]
    rebuilt, cfg2, info = load_model_from_checkpoint(path)
    assert cfg2 == cfg and not rebuilt.training
    assert info["iteration"] == 7 and info["weights"] == "student" and not info["model_differences"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])
    # overrides that keep the architecture are fine; ones that change it name the keys
    _, cfg3, _ = load_model_from_checkpoint(path, overrides=["--eval.mode=slide"])
    assert cfg3.eval.mode == "slide"
    with pytest.raises(ValueError, match=r"latest\.pt.*shape mismatch\(es\): decoder\.fuse"):
        load_model_from_checkpoint(path, overrides=["--model.channels=32"])
    with pytest.raises(ValueError, match=r"missing key\(s\): segmentor\.encoder.*unexpected key\(s\): encoder\."):
        load_model_from_checkpoint(path, overrides=["--model.hrda.enabled=true",
                                                    "--data.crop_size=[64,64]",
                                                    "--model.hrda.hr_crop_size=[32,32]"])
    with pytest.raises(ValueError, match="holds no teacher weights"):
        load_model_from_checkpoint(path, weights="teacher")


def test_corrupt_truncated_foreign_and_missing_checkpoints(tmp_path):
    cfg = tiny()
    path = tmp_path / "latest.pt"
    save_checkpoint(path, _state(cfg, build_model(cfg)))
    data = path.read_bytes()
    for name, payload in (("truncated.pt", data[: len(data) // 2]), ("garbage.pt", os.urandom(5000))):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=rf"{name}: the file is truncated, corrupt"):
            load_checkpoint(tmp_path / name)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt is not a cluda training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_failed_save_leaves_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    cfg = tiny()
    path = tmp_path / "latest.pt"
    save_checkpoint(path, _state(cfg, build_model(cfg)))
    good = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the disk "fills up"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _state(cfg, build_model(cfg)))
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["latest.pt"]
    assert load_checkpoint(path)["iteration"] == 7


def test_the_names_cluda_experiment_held_still_import_from_it():
    import cluda.build
    import cluda.checkpoint
    import cluda.config
    import cluda.experiment

    assert cluda.experiment.load_experiment is cluda.config.load_experiment
    assert cluda.experiment.Config is cluda.config.Config
    assert cluda.experiment.build_model is cluda.build.build_model
    assert cluda.experiment.load_checkpoint is cluda.checkpoint.load_checkpoint
    assert cluda.experiment.config_to_dict is cluda.config.to_dict


def test_pretrained_true_means_timm_s_download():
    assert tiny("--model.backbone=test_efficientnet", "--model.pretrained=true").model.pretrained is True
    assert tiny("--model.pretrained=false").model.pretrained is False  # random initialisation
    assert tiny("--model.pretrained=pretrained/mit_b0.pth").model.pretrained == "pretrained/mit_b0.pth"
    with pytest.raises(ConfigError, match=r"mit_b0 weights have no download.*pretrained/mit_b0\.pth"):
        tiny("--model.pretrained=true")
    with pytest.raises(ConfigError, match=r"model\.pretrained: expected null \| bool \| str"):
        tiny("--model.pretrained=3")


def test_pretrained_true_offline_fails_at_once_asking_for_a_local_file(tmp_path):
    # HF_HUB_OFFLINE=1 and an empty hub cache: offline on any machine.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--model.backbone=test_efficientnet",
         "--model.pretrained=true", "--experiment.device=cpu", f"--experiment.work_dir={tmp_path}",
         "--data.workers=0", "--train.max_iters=1", "--uda.start_iter=0"],
        env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: model.pretrained: true:"), proc.stderr
    assert "test_efficientnet" in lines[0] and "local weights file" in lines[0]
    assert not (tmp_path / "demo" / "config.yaml").exists()
