"""Every file in configs/ loads; the paper's configs run one training step (plus the final
evaluation) on tiny fake GTA5 / SYNTHIA / Cityscapes trees in the official layouts, written here
from synthetic scenes and prepared with `cluda.data.prepare`.

What is made tiny: the data (64 x 128 images, 64 x 64 crops, RCS minimum pixels scaled down, two
validation images), HRDA's crops and windows, one iteration. The encoders are swapped for small
ones of the same family because the real ones are too slow to build and step on this CPU:
MiT-B5 -> MiT-B0, Swin-L -> Swin-T, ResNet-101 -> ResNet-18; the real MiT-B5 network of
gta2cs_daformer_cluda is built and run forward once. The decoder keeps the config's sizes."""
import glob
import os
import re

import numpy as np
import pytest
from PIL import Image

import train
from cluda.config import load_experiment
from cluda.data import prepare as prep
from cluda.data.labels import SYNTHIA_ID_TO_TRAINID
from cluda.data.synthetic import make_scene, to_cityscapes_ids
from png16 import write_png16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PAPER = [p for p in CONFIGS if os.path.basename(p) != "demo.yaml"]
SIZE = (64, 128)
SMALL_BACKBONE = {"mit_b5": "mit_b0", "swin_large_patch4_window12_384": "swin_tiny_patch4_window7_224",
                  "resnet101": "resnet18"}
# The mIoU the CLUDA / MIC papers' tables give for each config's network (None: no paper has a
# number for it); for a combination no paper reports, the numbers of its parts, as bounds.
EXPECTED = {"gta2cs_daformer": "68.3", "synthia2cs_daformer": "60.9",
            "gta2cs_daformer_cluda": "69.9", "gta2cs_daformer_cluda_swinl": "70.1",
            "gta2cs_daformer_cluda_r101": "59.2", "synthia2cs_daformer_cluda": None,
            "gta2cs_hrda": "73.8", "synthia2cs_hrda": "65.8",
            "gta2cs_hrda_cluda": "74.4", "synthia2cs_hrda_cluda": "66.8",
            "gta2cs_source_only": None, "synthia2cs_source_only": None,
            # MIC paper (Hoyer et al., CVPR 2023)
            "gta2cs_daformer_mic": "70.6", "gta2cs_hrda_mic": "75.9", "synthia2cs_hrda_mic": "67.3",
            "synthia2cs_daformer_mic": None, "gta2cs_hrda_mic_cluda": None}
BOUNDS = {"gta2cs_hrda_mic_cluda": ("75.9", "74.4"), "synthia2cs_daformer_mic": ("60.9", "67.3")}


def _header(path):
    """The comment lines that open a config file, joined."""
    with open(path) as f:
        return "".join(line for line in f if line.startswith("#"))


def test_paper_config_headers_cite_the_papers_numbers():
    # The facts a header must state, whatever its wording or line breaks: the paper's mIoU for
    # the config's network (or the bounds of a combination no paper reports).
    for path in CONFIGS:
        assert _header(path), f"{path} has no comment header"
    for path in PAPER:
        name = os.path.basename(path)[:-5]
        cited = set(re.findall(r"\b\d{2}\.\d\b", _header(path)))
        wanted = {EXPECTED[name]} if EXPECTED[name] is not None else set(BOUNDS.get(name, ()))
        assert wanted <= cited, (path, wanted, cited)


def test_every_config_loads_with_the_papers_settings():
    assert len(CONFIGS) >= 13
    for path in CONFIGS:
        cfg = load_experiment(path)
        name = os.path.basename(path)[:-5]
        assert cfg.experiment.name == name, path
        if path not in PAPER:
            continue
        if name.startswith("synthia"):
            assert cfg.eval.protocols == [16, 13] and cfg.data.source.kind == "synthia"
        elif name.startswith("gta"):
            assert cfg.eval.protocols == [19] and cfg.data.source.kind == "gta"
        if "cluda" in name:  # the paper's decoder: embedding 512, C = 512
            assert cfg.cl.source and cfg.cl.mixed
            assert (cfg.model.embed_dim, cfg.model.channels, cfg.model.aspp_channels) == (512, 512, 512)
        else:
            assert not (cfg.cl.source or cfg.cl.mixed)
            assert (cfg.model.embed_dim, cfg.model.channels) == (256, 256)
        assert cfg.cl.objective == "paper"
        assert cfg.model.hrda.enabled == ("hrda" in name)
        assert cfg.mic.enabled == ("mic" in name) and not cfg.cl.masked
        if cfg.mic.enabled:  # MIC's 64 px blocks at full resolution: 32 on DAFormer's 0.5x crops
            assert cfg.mic.block_size == (64 if cfg.model.hrda.enabled else 32)
            assert (cfg.mic.ratio, cfg.mic.weight) == (0.7, 1.0)
        assert cfg.uda.enabled == ("source_only" not in name)
        if cfg.model.hrda.enabled:  # HRDA's RCS crop ratio and pseudo-label margins
            assert cfg.data.rcs_min_crop_ratio == 2.0
            assert cfg.data.target_pseudo_margins == [30, 240, 30, 30]
            assert (cfg.uda.ignore_top, cfg.uda.ignore_bottom) == (0, 0)
        else:
            assert cfg.data.rcs_min_crop_ratio == 0.5 and cfg.data.target_pseudo_margins is None
            assert (cfg.uda.ignore_top, cfg.uda.ignore_bottom) == (15, 120)
        swin = cfg.model.backbone.startswith("swin")  # the released README's Swin-L values
        assert (cfg.uda.fd_lambda, cfg.optim.poly_power) == ((0.009, 1.1) if swin else (0.005, 1.0))


def test_demo_is_the_synthetic_daformer_cluda_default():
    cfg = load_experiment(train.DEFAULT_CONFIG)
    assert os.path.basename(train.DEFAULT_CONFIG) == "demo.yaml"
    assert {cfg.data.source.kind, cfg.data.target.kind, cfg.data.val.kind} == {"synthetic"}
    assert cfg.model.backbone == "mit_b0" and cfg.model.pretrained is None
    assert cfg.uda.enabled and cfg.uda.start_iter > 0 and cfg.cl.source and cfg.cl.mixed


def _scene(i, domain, split="train"):
    img, label = make_scene(i, split=split, seed=3, height=SIZE[0], width=SIZE[1], domain=domain)
    return img, label


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    gta, synthia, cs = base / "gta", base / "synthia", base / "cityscapes"
    for d in (gta / "images", gta / "labels", synthia / "RGB", synthia / "GT" / "LABELS"):
        os.makedirs(d)
    to_synthia = np.zeros(256, np.uint16)  # train id -> SYNTHIA id (0 = void for the rest)
    for sid, tid in SYNTHIA_ID_TO_TRAINID.items():
        to_synthia[tid] = sid
    for i in range(4):
        img, label = _scene(i, "source")
        Image.fromarray(img).save(gta / "images" / f"{i:05d}.png")
        Image.fromarray(to_cityscapes_ids(label)).save(gta / "labels" / f"{i:05d}.png")
        Image.fromarray(img).save(synthia / "RGB" / f"{i:07d}.png")
        ids = to_synthia[label]
        write_png16(str(synthia / "GT" / "LABELS" / f"{i:07d}.png"),
                    np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], -1))
    for split, n in (("train", 4), ("val", 2)):
        os.makedirs(cs / "leftImg8bit" / split / "fake")
        os.makedirs(cs / "gtFine" / split / "fake")
        for i in range(n):
            img, label = _scene(i, "target", split)
            base_name = f"fake_000000_{i:06d}"
            Image.fromarray(img).save(cs / "leftImg8bit" / split / "fake" / f"{base_name}_leftImg8bit.png")
            Image.fromarray(to_cityscapes_ids(label)).save(
                cs / "gtFine" / split / "fake" / f"{base_name}_gtFine_labelIds.png")
    for kind, root in (("gta", gta), ("synthia", synthia), ("cityscapes", cs)):
        prep.prepare(kind, str(root), progress=False)
    return {"gta": gta, "synthia": synthia, "cityscapes": cs}


def tiny_paper_overrides(cfg, trees, work_dir):
    hw = f"[{SIZE[1]},{SIZE[0]}]"  # (long, short) resize bounds that keep the 64 x 128 images
    out = [f"--experiment.work_dir={work_dir}", "--experiment.device=cpu",
           f"--data.source.root={trees[cfg.data.source.kind]}",
           f"--data.target.root={trees['cityscapes']}", f"--data.val.root={trees['cityscapes']}",
           f"--data.source.scale={hw}", f"--data.target.scale={hw}", f"--data.val.scale={hw}",
           "--data.crop_size=[64,64]", "--data.rcs_min_pixels=20", "--data.workers=0",
           "--data.val.max_images=2", "--model.pretrained=null",
           "--model.hrda.hr_crop_size=[32,32]", "--model.hrda.hr_slide_size=[32,32]",
           "--model.hrda.hr_slide_stride=[16,16]", "--uda.ignore_top=4", "--uda.ignore_bottom=8",
           "--train.max_iters=1", "--train.tensorboard=false", "--cl.impl=torch",
           "--eval.crop_size=[64,64]", "--eval.stride=[32,32]", "--eval.workers=0"]
    if cfg.data.target_pseudo_margins is not None:  # HRDA's margins, scaled to the tiny images
        out.append("--data.target_pseudo_margins=[2,8,2,2]")
    out.append(f"--model.backbone={SMALL_BACKBONE[cfg.model.backbone]}")
    # MIC's blocks shrink with the crop (1024 or 512 -> 64): 4 px, 16 x 16 blocks per crop
    out.append(f"--mic.block_size={max(1, cfg.mic.block_size * 64 // cfg.data.crop_size[0])}")
    if cfg.model.img_size is not None:
        out.append("--model.img_size=[64,64]")
    return out


@pytest.mark.parametrize("path", PAPER, ids=[os.path.basename(p)[:-5] for p in PAPER])
def test_paper_config_runs_one_step_on_fake_official_trees(path, trees, tmp_path):
    cfg = load_experiment(path)
    result = train.main([path] + tiny_paper_overrides(cfg, trees, tmp_path))
    out = tmp_path / cfg.experiment.name
    with open(out / "log.csv") as f:
        header, row = f.readline().strip().split(","), f.readline().strip().split(",")
    values = dict(zip(header, row))
    terms = [c for c in header if c.startswith(("src.", "mix.", "mic."))]
    expected = ["src.ce"] + (["src.fd"] if cfg.uda.fd else []) + (["src.cl"] if cfg.cl.source else [])
    if cfg.uda.enabled:
        expected += ["mix.ce"] + (["mix.cl"] if cfg.cl.mixed else [])
        expected += (["mic.ce"] if cfg.mic.enabled else []) + (["mic.cl"] if cfg.cl.masked else [])
    assert terms == expected
    assert all(np.isfinite(float(values[t])) for t in terms)
    assert sorted(result["metrics"]) == sorted(cfg.eval.protocols)
    assert all(0 <= m["mIoU"] <= 1 for m in result["metrics"].values())


def test_a_paper_config_builds_its_real_mit_b5_network():
    """A full training step of MiT-B5 takes tens of seconds on this CPU; build the real network
    of gta2cs_daformer_cluda and run one forward pass instead."""
    import torch
    from cluda.build import build_model

    cfg = load_experiment(os.path.join(ROOT, "configs", "gta2cs_daformer_cluda.yaml"),
                          ["--model.pretrained=null"])
    model = build_model(cfg).eval()
    assert model.encoder.channels == [64, 128, 320, 512] and len(model.encoder.block3) == 40
    assert 90e6 < sum(p.numel() for p in model.parameters()) < 100e6
    with torch.no_grad():
        logits, fused = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 19, 16, 16) and fused.shape == (1, 512, 16, 16)
