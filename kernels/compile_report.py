"""Compile the pixel InfoNCE kernels for an NVIDIA GPU without one, and report what they cost.

Triton's CUDA backend compiles for any target architecture on a CPU-only machine (no driver is
needed until a kernel is launched), and the interpreter accepts code that the compiler would
reject. This module compiles the kernels a launch configuration runs (`kernels.triton_infonce`:
the forward and backward kernels, or the split-loop kernels in their two specialisations, the
uniform row blocks and the general ones) as a real launch would (pointers and C % 16 == 0
specialised as 16-divisible, as Triton's JIT does for PyTorch's aligned tensors), then reads off

- registers per thread and spill bytes (`ptxas -v`, the ptxas Triton bundles),
- shared memory (Triton's metadata),
- from the SASS (`nvdisasm`, bundled too, with source line information): the matrix instructions
  (HGMMA = Hopper wgmma, HMMA = mma.sync), and per loop of the kernel the spill instructions
  (STL / LDL) inside it, where they cost on every tile rather than once per program, and the
  SASS instructions one thread issues per iteration, per pair of the tile (BLOCK_M x BLOCK_N
  pairs over the program's threads), for every path through the loop body (a loop whose body
  branches, like the split backward's negative-only / class / masked class tiles, has several).

Loops are named by the source line of their back edge (the `for` statement). A nested loop (the
streamed channel chunks of the older kernels) counts its trips per outer iteration.

Usage (from the repository root; TRITON_INTERPRET must not be set):
    python -m kernels.compile_report --arch 80,86,90 --channels 512 --dtype bfloat16
    python -m kernels.compile_report --variants resident,split --inputs plain
"""
import argparse
import collections
import dataclasses
import linecache
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_infonce as ti

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Shared memory one program (thread block) may use, opt-in maximum, by compute capability (CUDA C
# Programming Guide, technical specifications): a kernel needing more fails to launch
# (Triton's OutOfResources), and kernels.triton_infonce then falls back to a smaller config.
SHARED_LIMIT_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Paths through one loop body enumerated at most (the bodies here have a handful).
_MAX_PATHS = 4096


@dataclass(frozen=True)
class LoopReport:
    """One loop of a compiled kernel's SASS.

    Attributes:
        line: source line of its back edge in kernels/triton_infonce.py (0 if unknown).
        source: that line's text, stripped.
        instructions: static SASS instructions in the loop (nested loops counted once).
        paths: distinct per-iteration instruction counts, one per path through the body, sorted
            (a nested loop's body counted as often as it runs per outer iteration).
        pairs_per_thread: pairs of one tile per thread (BLOCK_M * BLOCK_N / threads, divided by
            the programs that each walk the same pairs: the older backward's C / block_d channel
            programs), or None for a loop nested in a tile loop (a channel-chunk loop).
        spills: STL + LDL instructions in the loop.
        matrix: HGMMA + HMMA instructions in the loop.
        mufu: MUFU instructions (exp2, log2, reciprocal) in the loop.
    """

    line: int
    source: str
    instructions: int
    paths: Tuple[int, ...]
    pairs_per_thread: Optional[float]
    spills: int
    matrix: int
    mufu: int

    def per_pair(self) -> Optional[Tuple[float, ...]]:
        """Instructions per pair along each path, or None."""
        if not self.pairs_per_thread:
            return None
        return tuple(p / self.pairs_per_thread for p in self.paths)


@dataclass(frozen=True)
class KernelReport:
    """Resources of one compiled kernel.

    Attributes:
        kernel: "forward", "backward", "split forward/uniform", "split forward/general",
            "split backward/uniform" or "split backward/general".
        registers: registers per thread.
        spill_stores / spill_loads: bytes of spill stores / loads per thread (ptxas -v).
        loop_spills: STL + LDL instructions inside a loop of the SASS, or None without nvdisasm.
        shared_bytes: shared memory per program.
        matrix_ops: count of matrix instructions by name ("HGMMA", "HMMA"), from the SASS.
        loops: the loops that walk column tiles (those holding matrix instructions), in address
            order; empty without nvdisasm.
        wgmma_serialized: ptxas reported that it serialises the kernel's wgmma instructions
            (every HGMMA waits for the previous one).
    """

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    loop_spills: Optional[int]
    shared_bytes: int
    matrix_ops: Dict[str, int]
    loops: Tuple[LoopReport, ...] = field(default=())
    wgmma_serialized: bool = False


@dataclass(frozen=True)
class _Spec:
    """What to compile: a kernel with its signature and constexprs, and how its loops map to
    pairs (block_m * block_n pairs per tile over num_warps * 32 threads; inner_trips: iterations
    of a nested channel loop per tile; programs: programs that each walk every pair of a row
    block, the older backward's channel programs, C / block_d)."""

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    options: Dict[str, int]
    block_m: int
    block_n: int
    inner_trips: int = 1
    programs: int = 1


def _specs(cfg: "ti.TritonConfig", num_channels: int, dtype: torch.dtype, *,
           has_weight: bool, has_exclusive: bool, need_du: bool) -> List[_Spec]:
    """The kernels a resolved config launches, in launch order."""
    ft = _TRITON_TYPES[dtype]
    c_pad = max(16, triton.next_power_of_2(num_channels))
    layout = {name: "*i32" for name in ("gs_ptr", "ge_ptr", "cs_ptr", "ce_ptr")}
    specs = []
    sl = cfg.split_forward
    if sl is not None:
        sig = dict(f_ptr=f"*{ft}", rinv_ptr="*fp32", u_ptr="*fp32", **layout, np_ptr="*i32",
                   ex_ptr="*i8", blocks_ptr="*i32",
                   f_desc=f"tensordesc<{ft}[{sl.block_n}, {c_pad}]>" if sl.tma else f"*{ft}",
                   neg_ptr="*fp32", loss_ptr="*fp32", q_ptr="*fp32", n="i32", scale2="fp32")
        for uniform in (True, False):
            const = dict(C=num_channels, C_PAD=c_pad, UNIFORM=uniform, HAS_WEIGHT=has_weight,
                         HAS_EXCLUSIVE=has_exclusive, BLOCK_M=sl.block_m, BLOCK_N=sl.block_n,
                         DOT_PRECISION=cfg.dot_precision, NATIVE=True, TMA=sl.tma)
            specs.append(_Spec(f"split forward/{'uniform' if uniform else 'general'}",
                               ti._split_fwd_kernel, sig, const, sl.launch_options(),
                               sl.block_m, sl.block_n))
    else:
        sig = dict(f_ptr=f"*{ft}", rinv_ptr="*fp32", u_ptr="*fp32", **layout, np_ptr="*i32",
                   ex_ptr="*i8", neg_ptr="*fp32", loss_ptr="*fp32", q_ptr="*fp32",
                   n="i32", C="i32", inv_tau="fp32")
        const = dict(HAS_WEIGHT=has_weight, HAS_EXCLUSIVE=has_exclusive,
                     RESIDENT=cfg.resident_rows, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_C=cfg.forward_block_c(num_channels), DOT_PRECISION=cfg.dot_precision)
        trips = 1 if cfg.resident_rows else c_pad // cfg.forward_block_c(num_channels)
        specs.append(_Spec("forward", ti._infonce_fwd_kernel, sig, const, cfg.launch_options(),
                           cfg.block_m, cfg.block_n, trips))
    sl = cfg.split_backward
    if sl is not None:
        sig = dict(f_ptr=f"*{ft}", **{f"{v}_ptr": "*fp32" for v in (
                       "rinv", "proj", "b", "br", "u", "ur", "neg", "ca", "car", "a")},
                   **layout, ex_ptr="*i8", blocks_ptr="*i32",
                   f_desc=f"tensordesc<{ft}[{sl.block_n}, {c_pad}]>" if sl.tma else f"*{ft}",
                   df_ptr=f"*{ft}", du_ptr="*fp32", n="i32", scale2="fp32", inv_tau="fp32")
        for uniform, launch in ((True, sl), (False, sl.general_backward())):
            sig = dict(sig, f_desc=(f"tensordesc<{ft}[{launch.block_n}, {c_pad}]>" if launch.tma
                                    else f"*{ft}"))
            const = dict(C=num_channels, C_PAD=c_pad, UNIFORM=uniform, HAS_WEIGHT=has_weight,
                         HAS_EXCLUSIVE=has_exclusive, NEED_DU=need_du, BLOCK_M=launch.block_m,
                         BLOCK_N=launch.block_n, DOT_PRECISION=cfg.dot_precision,
                         **ti.product_constexprs(cfg, native_bf16=True), TMA=launch.tma)
            specs.append(_Spec(f"split backward/{'uniform' if uniform else 'general'}",
                               ti._split_bwd_kernel, sig, const, launch.launch_options(),
                               launch.block_m, launch.block_n))
    else:
        sig = dict(f_ptr=f"*{ft}", rinv_ptr="*fp32", proj_ptr="*fp32", u_ptr="*fp32",
                   a_ptr="*fp32", b_ptr="*fp32", neg_ptr="*fp32", **layout, ex_ptr="*i8",
                   df_ptr=f"*{ft}", du_ptr="*fp32", n="i32", C="i32", inv_tau="fp32")
        const = dict(HAS_WEIGHT=has_weight, HAS_EXCLUSIVE=has_exclusive, NEED_DU=need_du,
                     BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                     BLOCK_D=cfg.block_d, DOT_PRECISION=cfg.dot_precision,
                     **ti.product_constexprs(cfg, native_bf16=True))
        specs.append(_Spec("backward", ti._infonce_bwd_kernel, sig, const, cfg.launch_options(),
                           cfg.block_m, cfg.block_n, c_pad // cfg.block_c,
                           triton.cdiv(c_pad, cfg.block_d)))
    return specs


def _tool(name: str, arch: int) -> str:
    """Path of a CUDA tool bundled with Triton (next to its ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch)
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        ptxas = get_ptxas()
    return os.path.join(os.path.dirname(getattr(ptxas, "path", ptxas)), name)


def _ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` output (stderr) for the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""  # Triton compiles sm_90 kernels for sm_90a (wgmma)
        out = subprocess.run([_tool("ptxas", arch), "-v", f"--gpu-name=sm_{arch}{suffix}", src,
                              "-o", os.path.join(tmp, "kernel.o")],
                             capture_output=True, text=True, check=True)
    return out.stderr


def _ptxas_resources(ptx: str, arch: int):
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    text = _ptxas(ptx, arch)
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot read ptxas -v output:\n{text}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0].split(".")[0]


def _disassemble(cubin: bytes, arch: int) -> Optional[List[Tuple[int, str, int, Tuple[str, ...]]]]:
    """[(address, instruction, source line, labels at it)] of the SASS, or None without nvdisasm."""
    nvdisasm = _tool("nvdisasm", arch)
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", "-g", f.name], capture_output=True, text=True,
                              check=True).stdout
    insts, labels, line = [], [], 0
    for raw in text.splitlines():
        loc = re.search(r'//## File ".*?", line (\d+)', raw)
        if loc:
            line = int(loc.group(1))
            continue
        label = re.match(r"^\s*(\.L_x_\d+):", raw)
        if label:
            labels.append(label.group(1))
            continue
        inst = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if inst:
            insts.append((int(inst.group(1), 16), inst.group(2), line, tuple(labels)))
            labels = []
    return insts


def _branch_target(text: str) -> Optional[str]:
    target = re.search(r"BRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)", text)
    return target.group(1) if target else None


def _loops(insts, inner_trips: int) -> List[Tuple[int, int, int, Tuple[int, ...]]]:
    """Loops of the SASS as (first index, last index, back-edge source line, path lengths).

    A loop is a range from a label to a later branch back to it that holds no EXIT: the
    out-of-line retry blocks of Hopper's barrier waits branch back into a loop from after the
    kernel's end, which is not a loop of the program."""
    index = {label: i for i, (_, _, _, labels) in enumerate(insts) for label in labels}
    ranges = []
    for i, (_, text, line, _) in enumerate(insts):
        target = _branch_target(text)
        if target is not None and index.get(target, i + 1) <= i:
            lo = index[target]
            if not any(_opcode(t) == "EXIT" for _, t, _, _ in insts[lo:i + 1]):
                ranges.append((lo, i, line))
    result = []
    for lo, hi, line in ranges:
        inner = [(a, b) for a, b, _ in ranges if lo <= a and b <= hi and (a, b) != (lo, hi)]
        result.append((lo, hi, line, _paths(insts, index, lo, hi, inner, inner_trips)))
    return result


def _paths(insts, index, lo: int, hi: int, inner, inner_trips: int) -> Tuple[int, ...]:
    """Distinct instruction counts of the paths from lo to the back edge at hi.

    Forward branches inside the range fork a path; branches out of the range (exits, retry
    blocks) are taken as not taken; an inner loop is walked once and its body counted
    inner_trips times, and paths that skip it are dropped."""
    extra = {b: (inner_trips - 1) * (b - a + 1) for a, b in inner}
    inner_heads = {b: a for a, b in inner}
    lengths, stack = set(), [(lo, 0, 0)]
    while stack and len(lengths) < _MAX_PATHS:
        i, count, entered = stack.pop()
        while True:
            text = insts[i][1]
            count += 1 + extra.get(i, 0)
            entered += i in extra
            if i == hi:
                # A path that skips an inner loop (a zero-trip guard) is not one a tile takes.
                if entered >= len(inner):
                    lengths.add(count)
                break
            target = _branch_target(text)
            j = index.get(target) if target is not None else None
            conditional = text.startswith("@")
            if j is not None and lo < j <= hi and j > i:
                if conditional:
                    stack.append((j, count, entered))
                    i += 1
                else:
                    i = j
                continue
            if j is not None and inner_heads.get(i) == j:
                i += 1  # an inner loop's back edge: its repetitions are in `extra`
                continue
            if not conditional and (target is not None or _opcode(text) in ("EXIT", "RET")):
                break  # leaves the loop
            i += 1
    return tuple(sorted(lengths))


def _loop_reports(insts, spec: _Spec) -> Tuple[List[LoopReport], collections.Counter]:
    threads = 32 * spec.options["num_warps"]
    reports, in_loop = [], collections.Counter()
    loops = _loops(insts, spec.inner_trips)
    covered = set()
    for lo, hi, line, paths in loops:
        ops = collections.Counter(_opcode(t) for _, t, _, _ in insts[lo:hi + 1])
        for k in range(lo, hi + 1):
            if k not in covered:
                covered.add(k)
                in_loop[_opcode(insts[k][1])] += 1
        matrix = ops["HGMMA"] + ops["HMMA"]
        if not matrix:
            continue
        nested = any(a <= lo and hi <= b and (a, b) != (lo, hi) for a, b, _, _ in loops)
        reports.append(LoopReport(
            line=line, source=linecache.getline(ti.__file__, line).strip() if line else "",
            instructions=hi - lo + 1, paths=paths,
            pairs_per_thread=(None if nested
                              else spec.block_m * spec.block_n / threads / spec.programs),
            spills=ops["STL"] + ops["LDL"], matrix=matrix, mufu=ops["MUFU"]))
    return reports, in_loop


def compile_kernels(config: "ti.TritonConfig", *, num_channels: int, dtype: torch.dtype,
                    arch: int = 90, has_weight: bool = True, has_exclusive: bool = True,
                    need_du: bool = True) -> List[KernelReport]:
    """Compile the kernels of `config` for sm_<arch> and report their resources.

    Args:
        config: launch parameters (resolved here for num_channels and dtype).
        num_channels: C.
        dtype: input dtype (float16, bfloat16 or float32).
        arch: compute capability as an int (80: A100, 86: RTX 30 / A6000, 90: H100 / H200).
        has_weight / has_exclusive / need_du: which optional inputs the kernels are built for
            (all on: the largest variant of each kernel).

    Returns:
        One report per kernel: [forward, backward] for the older kernels, two specialisations
        (uniform, general) for each split-loop pass.
    """
    if ti.INTERPRETED:
        raise RuntimeError("kernels.triton_infonce was imported under TRITON_INTERPRET=1: "
                           "its kernels cannot be compiled; unset it")
    cfg = config.resolved(num_channels, dtype)
    if arch < 90:  # as a launch on that device does: TMA is Hopper's (see ti._on_device)
        cfg = dataclasses.replace(cfg, **{
            name: dataclasses.replace(getattr(cfg, name), tma=False)
            for name in ("split_forward", "split_backward") if getattr(cfg, name) is not None})
    reports = []
    for spec in _specs(cfg, num_channels, dtype, has_weight=has_weight,
                       has_exclusive=has_exclusive, need_du=need_du):
        fn, sig = spec.fn, spec.signature
        # As Triton's JIT specialises a launch: PyTorch's allocations are 16-byte aligned, and
        # C (512, 256, ...) is a multiple of 16; n (the number of valid pixels) is arbitrary.
        aligned = [a for a, t in sig.items() if t.startswith("*")]
        if "C" in sig and num_channels % 16 == 0:
            aligned.append("C")
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        sig = dict(sig, **{k: "constexpr" for k in spec.constexprs})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=spec.constexprs,
                                          attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=spec.options)
        ptxas = _ptxas(kernel.asm["ptx"], arch)
        registers, spill_stores, spill_loads = _ptxas_resources(kernel.asm["ptx"], arch)
        insts = _disassemble(kernel.asm["cubin"], arch)
        if insts is None:
            loop_spills, matrix, loops = None, {}, ()
        else:
            loops, in_loop = _loop_reports(insts, spec)
            total = collections.Counter(_opcode(t) for _, t, _, _ in insts)
            loop_spills = in_loop["STL"] + in_loop["LDL"]
            matrix = {op: total[op] for op in ("HGMMA", "HMMA") if total[op]}
        reports.append(KernelReport(spec.name, registers, spill_stores, spill_loads, loop_spills,
                                    kernel.metadata.shared, matrix, tuple(loops),
                                    "wgmma.mma_async instructions are serialized" in ptxas))
    return reports


def _format_loop(loop: LoopReport) -> str:
    per_pair = loop.per_pair()
    if per_pair is None:
        cost = f"{loop.instructions} instr (nested)"
    else:
        cost = "/".join(f"{p:.0f}" for p in per_pair) + " instr/pair"
    source = loop.source if len(loop.source) <= 48 else loop.source[:45] + "..."
    return (f"    L{loop.line:<5} {source:<48} {cost:<24} spills {loop.spills:<3} "
            f"MUFU/iter {loop.mufu}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90",
                   help="compute capabilities, comma-separated, e.g. 80,86,90")
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
    try:
        arches = [int(a) for a in args.arch.split(",")]
    except ValueError:
        p.error(f"--arch takes comma-separated integers, got {args.arch!r}")
    names = [ti.resolve_variant(v) for v in args.variants.split(",")]
    for arch in arches:
        limit = SHARED_LIMIT_KIB.get(arch)
        print(f"sm_{arch}, C={args.channels}, {args.dtype}, optional inputs: {args.inputs}, "
              f"triton {triton.__version__} (shared memory limit of sm_{arch}: "
              f"{'unknown' if limit is None else f'{limit} KiB'})")
        print(f"{'variant':<16} {'kernel':<22} {'regs':>4} {'spill st/ld B':>13} {'in loops':>8} "
              f"{'smem KiB':>8} {'fits':>4}  matrix ops")
        print("  then per tile loop: source line of its back edge, SASS instructions per pair on "
              "each path through its body, spill instructions, MUFU per iteration")
        for name in names:
            for r in compile_kernels(ti.variant_config(name, dtype), num_channels=args.channels,
                                     dtype=dtype, arch=arch, has_weight=every,
                                     has_exclusive=every, need_du=every):
                ops = ", ".join(f"{k} {v}" for k, v in r.matrix_ops.items()) or "-"
                if r.wgmma_serialized:
                    ops += " (serialized)"
                fits = "?" if limit is None else ("yes" if r.shared_bytes <= limit * 1024 else "NO")
                print(f"{name:<16} {r.kernel:<22} {r.registers:>4} "
                      f"{f'{r.spill_stores}/{r.spill_loads}':>13} "
                      f"{'-' if r.loop_spills is None else r.loop_spills:>8} "
                      f"{r.shared_bytes / 1024:>8.1f} {fits:>4}  {ops}",
                      flush=True)
                for loop in r.loops:
                    print(_format_loop(loop), flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
