"""Compile the pixel InfoNCE kernels for an NVIDIA GPU without one, and report their resources.

Triton's CUDA backend compiles for any target architecture on a CPU-only machine (no driver is
needed until a kernel is launched), and the interpreter accepts code that the compiler would
reject. This module compiles `kernels.triton_infonce`'s two kernels for a launch configuration as
a real launch would (pointers and C % 16 == 0 specialised as 16-divisible, as Triton's JIT does for
PyTorch's aligned tensors), then reads off

- registers per thread and spill bytes (`ptxas -v`, the ptxas Triton bundles),
- shared memory (Triton's metadata),
- from the SASS (`nvdisasm`, bundled too): the matrix instructions used (HGMMA = Hopper wgmma,
  HMMA = mma.sync) and the spill instructions (STL / LDL) that sit inside a loop, where they cost
  on every tile rather than once per program.

Usage (from the repository root; TRITON_INTERPRET must not be set):
    python -m kernels.compile_report --arch 90 --channels 512 --dtype bfloat16
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_infonce as ti

_TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
# Shared memory one program (thread block) may use, opt-in maximum, by compute capability (CUDA C
# Programming Guide, technical specifications): a kernel needing more fails to launch
# (Triton's OutOfResources), and kernels.triton_infonce then falls back to a smaller config.
SHARED_LIMIT_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KernelReport:
    """Resources of one compiled kernel.

    Attributes:
        kernel: "forward" or "backward".
        registers: registers per thread.
        spill_stores / spill_loads: bytes of spill stores / loads per thread (ptxas -v).
        loop_spills: STL + LDL instructions inside a loop of the SASS, or None without nvdisasm.
        shared_bytes: shared memory per program.
        matrix_ops: count of matrix instructions by name ("HGMMA", "HMMA"), from the SASS.
    """

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    loop_spills: Optional[int]
    shared_bytes: int
    matrix_ops: Dict[str, int]


def _signatures(cfg: "ti.TritonConfig", num_channels: int, dtype: torch.dtype, *,
                has_weight: bool, has_exclusive: bool, need_du: bool):
    """(kernel name, jit function, signature, constexprs) of both kernels for a resolved config."""
    ft = _TRITON_TYPES[dtype]
    layout = {name: "*i32" for name in ("gs_ptr", "ge_ptr", "cs_ptr", "ce_ptr")}
    fwd_sig = dict(f_ptr=ft, rinv_ptr="*fp32", u_ptr="*fp32", **layout, np_ptr="*i32",
                   ex_ptr="*i8", neg_ptr="*fp32", loss_ptr="*fp32", q_ptr="*fp32",
                   n="i32", C="i32", inv_tau="fp32")
    fwd_const = dict(HAS_WEIGHT=has_weight, HAS_EXCLUSIVE=has_exclusive,
                     RESIDENT=cfg.resident_rows, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_C=cfg.forward_block_c(num_channels), DOT_PRECISION=cfg.dot_precision)
    bwd_sig = dict(f_ptr=ft, rinv_ptr="*fp32", proj_ptr="*fp32", u_ptr="*fp32", a_ptr="*fp32",
                   b_ptr="*fp32", neg_ptr="*fp32", **layout, ex_ptr="*i8", df_ptr=ft,
                   du_ptr="*fp32", n="i32", C="i32", inv_tau="fp32")
    bwd_const = dict(HAS_WEIGHT=has_weight, HAS_EXCLUSIVE=has_exclusive, NEED_DU=need_du,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                     BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
                     **ti.product_constexprs(cfg, native_bf16=True))
    return [("forward", ti._infonce_fwd_kernel, fwd_sig, fwd_const),
            ("backward", ti._infonce_bwd_kernel, bwd_sig, bwd_const)]


def _tool(name: str, arch: int) -> str:
    """Path of a CUDA tool bundled with Triton (next to its ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch)
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        ptxas = get_ptxas()
    return os.path.join(os.path.dirname(getattr(ptxas, "path", ptxas)), name)


def _ptxas_resources(ptx: str, arch: int):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""  # Triton compiles sm_90 kernels for sm_90a (wgmma)
        out = subprocess.run([_tool("ptxas", arch), "-v", f"--gpu-name=sm_{arch}{suffix}", src,
                              "-o", os.path.join(tmp, "kernel.o")],
                             capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot read ptxas -v output:\n{out.stderr}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _sass_counts(cubin: bytes, arch: int):
    """(instructions inside loops by opcode, all instructions by opcode) from the SASS, or None.

    A loop is the address range from a label to a later branch back to it."""
    nvdisasm = _tool("nvdisasm", arch)
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    label_addr, pending, insts = {}, [], []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        inst = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if inst:
            addr = int(inst.group(1), 16)
            for name in pending:
                label_addr[name] = addr
            pending = []
            insts.append((addr, inst.group(2)))
    loops = []
    for addr, text_ in insts:
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text_)
        if target and label_addr.get(target.group(1), addr + 1) <= addr:
            loops.append((label_addr[target.group(1)], addr))
    in_loop, total = collections.Counter(), collections.Counter()
    for addr, text_ in insts:
        op = re.sub(r"^@!?U?P[T\d]+\s+", "", text_).split()[0].split(".")[0]
        total[op] += 1
        if any(lo <= addr <= hi for lo, hi in loops):
            in_loop[op] += 1
    return in_loop, total


def compile_kernels(config: "ti.TritonConfig", *, num_channels: int, dtype: torch.dtype,
                    arch: int = 90, has_weight: bool = True, has_exclusive: bool = True,
                    need_du: bool = True) -> List[KernelReport]:
    """Compile both kernels of `config` for sm_<arch> and report their resources.

    Args:
        config: launch parameters (resolved here for num_channels and dtype).
        num_channels: C.
        dtype: input dtype (float16, bfloat16 or float32).
        arch: compute capability as an int (80: A100, 90: H100 / H200).
        has_weight / has_exclusive / need_du: which optional inputs the kernels are built for
            (all on: the largest variant of each kernel).

    Returns:
        [forward report, backward report].
    """
    if ti.INTERPRETED:
        raise RuntimeError("kernels.triton_infonce was imported under TRITON_INTERPRET=1: "
                           "its kernels cannot be compiled; unset it")
    cfg = config.resolved(num_channels, dtype)
    reports = []
    for name, fn, sig, const in _signatures(cfg, num_channels, dtype, has_weight=has_weight,
                                            has_exclusive=has_exclusive, need_du=need_du):
        # As Triton's JIT specialises a launch: PyTorch's allocations are 16-byte aligned, and
        # C (512, 256, ...) is a multiple of 16; n (the number of valid pixels) is arbitrary.
        aligned = [a for a, t in sig.items() if t.startswith("*")]
        if num_channels % 16 == 0:
            aligned.append("C")
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        sig = dict(sig, **{k: "constexpr" for k in const})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=cfg.launch_options())
        registers, spill_stores, spill_loads = _ptxas_resources(kernel.asm["ptx"], arch)
        counts = _sass_counts(kernel.asm["cubin"], arch)
        loop_spills = None if counts is None else counts[0]["STL"] + counts[0]["LDL"]
        matrix = {} if counts is None else {op: counts[1][op] for op in ("HGMMA", "HMMA")
                                            if counts[1][op]}
        reports.append(KernelReport(name, registers, spill_stores, spill_loads, loop_spills,
                                    kernel.metadata.shared, matrix))
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--channels", type=int, default=512, help="C")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--variants", default=",".join(ti.VARIANTS),
                   help=f"comma-separated names from {tuple(ti.VARIANTS)}")
    p.add_argument("--inputs", choices=("all", "plain"), default="all",
                   help="kernels built for every optional input (pos_weight, exclusive, its "
                        "gradient: the largest kernels) or for none (the benchmark's calls)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    every = args.inputs == "all"
    print(f"sm_{args.arch}, C={args.channels}, {args.dtype}, optional inputs: {args.inputs}, "
          f"triton {triton.__version__}")
    limit = SHARED_LIMIT_KIB.get(args.arch)
    print(f"{'variant':<14} {'kernel':<8} {'regs':>4} {'spill st/ld B':>13} {'in loops':>8} "
          f"{'smem KiB':>8} {'fits':>4}  matrix ops   (shared memory limit of sm_{args.arch}: "
          f"{'unknown' if limit is None else f'{limit} KiB'})")
    for name in args.variants.split(","):
        for r in compile_kernels(ti.variant_config(name, dtype), num_channels=args.channels,
                                 dtype=dtype, arch=args.arch, has_weight=every,
                                 has_exclusive=every, need_du=every):
            ops = ", ".join(f"{k} {v}" for k, v in r.matrix_ops.items()) or "-"
            print(f"{name:<14} {r.kernel:<8} {r.registers:>4} "
                  f"{f'{r.spill_stores}/{r.spill_loads}':>13} "
                  f"{'-' if r.loop_spills is None else r.loop_spills:>8} "
                  f"{r.shared_bytes / 1024:>8.1f} "
                  f"{'?' if limit is None else ('yes' if r.shared_bytes <= limit * 1024 else 'NO'):>4}  "
                  f"{ops}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
