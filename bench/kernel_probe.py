"""The GPU measurement of the launch presets (issue 12's protocol), in the steps `bench/gpu_check.sh
--kernel` runs around the timing cells of `bench.bench_pixel_infonce --variants`:

- `--prepare`: the same-run references (the 8192^3 bfloat16 matmul rate, and the shape-matched
  product F[:8192] @ F^T over the main cell's valid rows, 8192 x ~118K x 512, which has the
  kernels' K = C), the SM clock, a compile warm-up of every preset at N = 4,096 (compile seconds
  logged, so JIT time stays out of the timings), and a correctness gate: every preset against the
  tiled torch path at N = 32,768 (loss, feature gradient; relative norm). -> OUT/kernel_probe.json
- `--report`: the short table, from that JSON and the rows the timing cells appended to
  OUT/pixel_infonce.csv: per preset fwd, bwd and fwd+bwd at the main cell with TFLOP/s and the
  share of both references, memory and determinism, the regression cells against the default's
  in the same run, and issue 12's targets.

Usage (gpu_check.sh calls it; on a CPU only as part of its --dry-run):
    python -m bench.kernel_probe --prepare --variants resident,split --out OUT
    python -m bench.kernel_probe --report --out OUT
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.pixel_infonce.inputs import DTYPES, TEMPERATURE, make_inputs
from bench.pixel_infonce.providers import make_forward
from bench.pixel_infonce.report import CSV_NAME
from bench.utils import device_name, git_revision, library_versions, matmul_tflops, read_rows

JSON_NAME = "kernel_probe.json"
# Relative-norm bounds of the gate, per dtype: the GPU tests' HALF_TOL for 16-bit inputs (the
# bfloat16 product rounds H to 2**-9), float32's rounding otherwise.
GATE_TOL = {"bfloat16": 4e-2, "float16": 4e-3, "float32": 1e-4}
# Issue 12's targets for the main cell (N = 131,072, C = 512, bfloat16).
TARGET_FULL_MS, TARGET_SHARE, TARGET_FWD_MS, TARGET_BWD_MS = 110.0, 0.40, 32.0, 78.0
# A regression cell may be at most this much slower than the default preset's in the same run.
REGRESSION_SLACK = 1.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sm_clock_mhz() -> Optional[str]:
    """nvidia-smi's current and maximum SM clock ("1980 / 1980 MHz"), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{out[0].replace(',', ' /')} MHz" if out else None


def shape_matched_tflops(feats: torch.Tensor, labels: torch.Tensor, device: torch.device,
                         rows: int = 8192) -> Dict[str, object]:
    """Rate of F[:rows] @ F^T over the valid rows F of a cell (the kernels' GEMM shape: K = C)."""
    valid = feats.detach()[(labels >= 0) & (labels != 255)]
    a, b = valid[:rows], valid.t()
    flops = 2.0 * a.shape[0] * b.shape[1] * a.shape[1]
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: torch.mm(a, b), quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms  # one quantile: a float
    else:
        torch.mm(a, b)
        start = time.perf_counter()
        torch.mm(a, b)
        ms = (time.perf_counter() - start) * 1e3
    return dict(shape=[a.shape[0], b.shape[1], a.shape[1]], tflops=flops / (ms * 1e-3) / 1e12)


def _loss_and_grad(provider: str, inp) -> List[torch.Tensor]:
    inp.feats.grad = None
    loss = make_forward(provider, inp)()
    loss.backward(inp.upstream)
    grad = inp.feats.grad.detach().float().clone()
    inp.feats.grad = None
    return [loss.detach().float(), grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def prepare(variants: Sequence[str], *, n: int, c: int, dtype: str, gate_n: int, warm_n: int,
            device: torch.device, out: Path) -> Dict[str, object]:
    """References, compile warm-up and gate (see the module docstring); writes OUT/JSON_NAME."""
    torch_dtype = DTYPES[dtype]
    result: Dict[str, object] = dict(device=device_name(device), git_rev=git_revision(),
                                     sm_clock=sm_clock_mhz() if device.type == "cuda" else None,
                                     main=dict(n=n, c=c, dtype=dtype), variants=list(variants),
                                     **library_versions())
    start = time.perf_counter()
    kind = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")
    result["matmul_tflops"] = matmul_tflops(device, kind, 8192 if device.type == "cuda" else 256)
    inp = make_inputs(n, c, torch_dtype, device)
    result["matmul_shape"] = shape_matched_tflops(inp.feats, inp.labels, device)
    result["pair_fraction"] = inp.pair_fraction
    del inp
    print(f"references ({time.perf_counter() - start:.1f} s): {kind} mm "
          f"{result['matmul_tflops']:.4g} TFLOP/s, shape-matched "
          f"{result['matmul_shape']['shape']} {result['matmul_shape']['tflops']:.4g} TFLOP/s, "
          f"SM clock {result['sm_clock']}", flush=True)

    warm = make_inputs(warm_n, c, torch_dtype, device, seed=1)
    result["compile_s"] = {}
    for name in variants:
        start = time.perf_counter()
        try:
            _loss_and_grad(f"triton:{name}", warm)
            _sync(device)
            result["compile_s"][name] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - a preset that fails to compile is a result
            result["compile_s"][name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        took = result["compile_s"][name]
        print(f"warm-up {name}: " + (f"{took:.1f} s" if isinstance(took, float) else took),
              flush=True)
    del warm

    gate_inp = make_inputs(gate_n, c, torch_dtype, device, seed=2)
    ref = _loss_and_grad("torch", gate_inp)
    result["gate"] = {}
    for name in variants:
        if isinstance(result["compile_s"].get(name), str):
            result["gate"][name] = dict(ok=False, error="did not compile")
            continue
        try:
            got = _loss_and_grad(f"triton:{name}", gate_inp)
            errs = [_rel(a, b) for a, b in zip(got, ref)]
            ok = all(e < GATE_TOL[dtype] for e in errs) and all(bool(torch.isfinite(a).all())
                                                                 for a in got)
            result["gate"][name] = dict(ok=ok, loss_rel=errs[0], grad_rel=errs[1])
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            result["gate"][name] = dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        print(f"gate {name} (N={gate_n} against the tiled torch path): {result['gate'][name]}",
              flush=True)
    result["gate_n"] = gate_n
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(result, indent=1))
    return result


def passing(out: Path) -> List[str]:
    """The presets that compiled and passed the gate, from OUT/JSON_NAME."""
    data = json.loads((out / JSON_NAME).read_text())
    return [v for v in data["variants"] if data["gate"].get(v, {}).get("ok")]


def _f(row: Optional[Dict[str, str]], key: str) -> Optional[float]:
    try:
        return float(row[key]) if row and row.get(key) else None
    except ValueError:
        return None


def report(out: Path, default: str = "resident") -> str:
    """The short table (see the module docstring)."""
    data = json.loads((out / JSON_NAME).read_text())
    rows = read_rows(out / CSV_NAME) if (out / CSV_NAME).exists() else []
    cells: Dict[tuple, Dict[str, Dict[str, str]]] = {}
    for r in rows:
        if r["provider"].startswith("triton:"):
            key = (r["provider"].split(":", 1)[1], int(r["n"]), int(r["c"]), r["dtype"])
            cells.setdefault(key, {})[r["pass"]] = r
    mm, shape = data["matmul_tflops"], data["matmul_shape"]["tflops"]
    main = data["main"]
    lines = [f"== kernel presets on {data['device']} (rev {data['git_rev']}, torch "
             f"{data.get('torch')}, triton {data.get('triton')}, SM clock {data['sm_clock']})",
             f"references: 8192^3 mm {mm:.4g} TFLOP/s; shape-matched "
             f"{' x '.join(str(s) for s in data['matmul_shape']['shape'])} {shape:.4g} TFLOP/s",
             f"gate (N={data['gate_n']:,} against the tiled torch path, relative norm) and "
             "compile warm-up:"]
    for name in data["variants"]:
        g = data["gate"].get(name, {})
        verdict = ("ok" if g.get("ok") else "FAILED") + (
            f" loss {g['loss_rel']:.2g} grad {g['grad_rel']:.2g}" if "loss_rel" in g
            else f" {g.get('error', '')}")
        compile_s = data["compile_s"].get(name)
        compile_s = f"{compile_s:.1f} s" if isinstance(compile_s, float) else compile_s
        lines.append(f"  {name:<12} {verdict}; first call {compile_s}")
    lines.append(f"main cell N={main['n']:,} C={main['c']} {main['dtype']} (medians; targets "
                 f"fwd <= {TARGET_FWD_MS:g} ms, bwd <= {TARGET_BWD_MS:g} ms, fwd+bwd <= "
                 f"{TARGET_FULL_MS:g} ms and >= {100 * TARGET_SHARE:g} % of the 8192^3 rate):")
    lines.append(f"  {'preset':<12} {'fwd ms':>8} {'bwd ms':>8} {'fwd+bwd':>8} {'TFLOP/s':>8} "
                 f"{'%mm':>6} {'%shape':>6} {'MiB':>7} {'det':>4}  verdict")
    for name in data["variants"]:
        passes = cells.get((name, main["n"], main["c"], main["dtype"]), {})
        full = passes.get("full")
        ms = {p: _f(passes.get(p), "median_ms") for p in ("fwd", "bwd", "full")}
        tflops = _f(full, "tflops")
        if ms["full"] is None:
            lines.append(f"  {name:<12} not timed ({(full or {}).get('status', 'no row')})")
            continue
        met = (ms["full"] <= TARGET_FULL_MS and tflops / mm >= TARGET_SHARE
               and (ms["fwd"] or 1e9) <= TARGET_FWD_MS and (ms["bwd"] or 1e9) <= TARGET_BWD_MS)
        fmt = {p: "-" if v is None else f"{v:.4g}" for p, v in ms.items()}
        lines.append(f"  {name:<12} {fmt['fwd']:>8} {fmt['bwd']:>8} {fmt['full']:>8} "
                     f"{tflops:>8.4g} {100 * tflops / mm:>6.1f} {100 * tflops / shape:>6.1f} "
                     f"{full.get('peak_mem_mib') or '-':>7} {full.get('deterministic') or '-':>4}"
                     f"  {'targets met' if met else 'targets missed'}")
    others = sorted({k[1:] for k in cells} - {(main["n"], main["c"], main["dtype"])})
    if others:
        lines.append(f"regression cells (fwd+bwd ms; ratio to {default!r} in this run, "
                     f"<= {REGRESSION_SLACK:g} passes):")
        for n, c, dtype in others:
            base = _f(cells.get((default, n, c, dtype), {}).get("full"), "median_ms")
            parts = []
            for name in data["variants"]:
                ms = _f(cells.get((name, n, c, dtype), {}).get("full"), "median_ms")
                if ms is None:
                    continue
                ratio = f" ({ms / base:.2f}x)" if base and name != default else ""
                flag = " SLOWER" if base and ms > REGRESSION_SLACK * base else ""
                parts.append(f"{name} {ms:.4g}{ratio}{flag}")
            lines.append(f"  N={n:,} C={c} {dtype}: " + ("; ".join(parts) or "not timed"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="references, warm-up and gate")
    p.add_argument("--report", action="store_true", help="print the short table")
    p.add_argument("--passing", action="store_true",
                   help="print the comma-separated presets that passed the gate")
    p.add_argument("--out", type=Path, required=True, help="folder of the run's files")
    p.add_argument("--variants", default="resident,split,split_tma,split_m32")
    p.add_argument("--n", type=int, default=131072, help="the main cell's N")
    p.add_argument("--c", type=int, default=512, help="the main cell's C")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--gate-n", type=int, default=32768)
    p.add_argument("--warm-n", type=int, default=4096)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    args = p.parse_args(argv)
    if args.passing:
        print(",".join(passing(args.out)))
        return 0
    if args.report:
        print(report(args.out))
        return 0
    if not args.prepare:
        p.error("give --prepare, --report or --passing")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_infonce loads
    from kernels.triton_infonce import resolve_variant

    names = [resolve_variant(v) for v in args.variants.split(",") if v]
    result = prepare(names, n=args.n, c=args.c, dtype=args.dtype, gate_n=args.gate_n,
                     warm_n=args.warm_n, device=device, out=args.out)
    failed = [v for v in names if not result["gate"][v].get("ok")]
    print(f"gate: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"temperature {TEMPERATURE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
