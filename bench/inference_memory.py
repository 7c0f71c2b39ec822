"""The inference memory estimate (`cluda.inference_memory`) against measured peak memory.

For each case: build the network of a config (random weights), run the evaluation's inference
(`cluda.evaluate.predict_probs` with `make_predict_fn`, scores at the input's size) on a random
image once to warm up, then measure one call's peak memory growth (`bench.utils.measure_call`:
CUDA `max_memory_allocated`, CPU peak RSS) and compare it with `MemoryCheck.estimate`. The ratio
estimate / measured should stay near 1; the check refuses only what the estimate says cannot fit,
so an estimate far above the measurement would refuse runs that fit.

Usage (from the repository root):
    python -m bench.inference_memory            # the CPU cases (MiT-B0 / B2, ~2 min on 2 cores)
    python -m bench.inference_memory --cuda     # larger cases on a GPU (MiT-B5, 1024 x 2048)

Writes bench/results/inference_memory_<device kind>.md (device, date, git revision).
"""
import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.utils import REPO_ROOT, device_name, git_revision, library_versions, measure_call
from cluda.inference import make_predict_fn, predict_probs
from cluda.build import build_model
from cluda.config import load_experiment
from cluda.inference_memory import GIB, MemoryCheck

# (label, overrides, input height, input width)
CPU_CASES = [
    ("MiT-B0, C 256, whole", ["--model.backbone=mit_b0", "--model.channels=256"], 256, 512),
    ("MiT-B0, C 256, whole", ["--model.backbone=mit_b0", "--model.channels=256"], 512, 1024),
    ("MiT-B0, C 512, whole", ["--model.backbone=mit_b0"], 512, 1024),
    ("MiT-B2, C 512, whole", ["--model.backbone=mit_b2"], 512, 1024),
    ("MiT-B0, C 512, slide 512/341", ["--model.backbone=mit_b0", "--eval.mode=slide"], 512, 1024),
]
CUDA_CASES = [
    ("MiT-B5, C 512, whole", [], 1024, 2048),
    ("MiT-B5, C 512, slide 512/341", ["--eval.mode=slide"], 1024, 2048),
    ("MiT-B5, C 512, whole", [], 2048, 4096),
    ("HRDA MiT-B5, whole", ["--model.hrda.enabled=true", "--data.crop_size=[1024,1024]",
                            "--model.hrda.hr_crop_size=[512,512]"], 1024, 2048),
]


def run_case(overrides, height, width, device):
    cfg = load_experiment(None, ["--model.pretrained=null", "--train.amp=false"] + overrides)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    predict = make_predict_fn(model, cfg)
    img = torch.randn(1, 3, height, width, device=device)
    with torch.no_grad():
        predict_probs(predict, img[..., :64, :128], num_classes=19)  # warm-up: kernels, pools
        _, peak = measure_call(lambda: predict_probs(predict, img, num_classes=19), device)
    estimate = MemoryCheck(model, cfg, device).estimate(img.shape, (height, width))
    del model, img
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return estimate, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="the GPU cases")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    torch.set_num_threads(args.threads)
    rows = []
    for label, overrides, height, width in (CUDA_CASES if args.cuda else CPU_CASES):
        estimate, peak = run_case(overrides, height, width, device)
        ratio = f"{estimate / peak:.2f}" if peak else "-"
        measured = f"{peak / GIB:.2f}" if peak is not None else "n/a"
        rows.append(f"| {label} | {height} x {width} | {estimate / GIB:.2f} | {measured} | {ratio} |")
        print(rows[-1], flush=True)
    versions = library_versions()
    text = "\n".join([
        "# Inference memory: estimate vs measured",
        "",
        f"Device: {device_name(device)}; {datetime.now(timezone.utc):%Y-%m-%d}; git "
        f"{git_revision()}; torch {versions['torch']}. float32, batch 1, no test-time "
        "augmentation, scores at the input's size. Measured: peak growth of one "
        "`predict_probs` call after a warm-up (CUDA allocator peak / CPU peak RSS).",
        "",
        "| network, mode | input | estimate GiB | measured GiB | estimate / measured |",
        "|---|---|---:|---:|---:|",
        *rows, ""])
    out = REPO_ROOT / "bench" / "results" / f"inference_memory_{device.type}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
