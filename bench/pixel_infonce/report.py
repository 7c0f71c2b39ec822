"""The benchmark's outputs, rebuilt from the results CSV: OUT/pixel_infonce.csv (one row per cell
and pass, appended run after run, each stamped with device, date and git revision),
OUT/pixel_infonce.md (one section per run, newest first, with the kernel's targets on GPU runs),
OUT/pixel_infonce.png (time and peak memory of forward + backward against N, log-log, the latest
measurement of each cell on the newest run's device), and the short tables printed at the end of
a run.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bench.pixel_infonce.inputs import INPUTS_NOTE
from bench.pixel_infonce.providers import PROVIDERS
from bench.pixel_infonce.runner import INTERPRETER_NOTE, PASSES
from bench.utils import merge_rows as utils_merge_rows
from bench.utils import read_rows

COLUMNS = ("date", "device", "git_rev", "torch", "triton", "threads", "provider", "n", "c",
           "dtype", "pass", "pair_fraction", "median_ms", "p20_ms", "p80_ms", "reps", "timer",
           "peak_mem_mib", "tflops", "matmul_kind", "matmul_tflops", "share_of_matmul",
           "deterministic", "status", "note")
RUN_KEY = ("date", "device", "git_rev")
CSV_NAME, MD_NAME, PNG_NAME = "pixel_infonce.csv", "pixel_infonce.md", "pixel_infonce.png"


def _f(row: Dict[str, str], key: str) -> Optional[float]:
    value = row.get(key, "")
    try:
        return float(value) if value not in ("", None) else None
    except ValueError:
        return None


def group_runs(rows: Sequence[Dict[str, str]]) -> List[List[Dict[str, str]]]:
    """Rows grouped by run (date, device, revision), newest run first."""
    runs: Dict[tuple, List[Dict[str, str]]] = {}
    for row in rows:
        runs.setdefault(tuple(row[k] for k in RUN_KEY), []).append(row)
    return [runs[k] for k in sorted(runs, key=lambda k: k[0], reverse=True)]


def _cells(run: Sequence[Dict[str, str]]) -> Dict[tuple, Dict[str, Dict[str, str]]]:
    """(provider, n, c, dtype) -> pass -> row, in table order (C, dtype, N, provider)."""
    cells: Dict[tuple, Dict[str, Dict[str, str]]] = {}
    for row in run:
        cells.setdefault((row["provider"], int(row["n"]), int(row["c"]), row["dtype"]), {})[row["pass"]] = row
    order = sorted(cells, key=lambda k: (k[2], k[3], k[1], PROVIDERS.index(k[0]) if k[0] in PROVIDERS else 9))
    return {k: cells[k] for k in order}


def _num(x: float) -> str:
    """4 significant digits, without an exponent for large values (104,300 rather than 1.043e+05)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _ms(row: Optional[Dict[str, str]], spread: bool = False) -> str:
    if row is None or _f(row, "median_ms") is None:
        return "-"
    text = _num(_f(row, "median_ms"))
    if spread and _f(row, "p20_ms") is not None and _f(row, "p80_ms") is not None:
        text += f" [{_num(_f(row, 'p20_ms'))}, {_num(_f(row, 'p80_ms'))}]"
    return text


def _mib(row: Optional[Dict[str, str]]) -> str:
    value = None if row is None else _f(row, "peak_mem_mib")
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _status(passes: Dict[str, Dict[str, str]]) -> str:
    statuses = {p: r["status"] for p, r in passes.items()}
    if len(set(statuses.values())) == 1:
        return next(iter(statuses.values()))
    return "; ".join(f"{p}: {statuses[p]}" for p in PASSES if p in statuses)


def _pick(run, provider, n, c, dtype, pass_="full") -> Optional[Dict[str, str]]:
    for row in run:
        if (row["provider"], int(row["n"]), int(row["c"]), row["dtype"], row["pass"]) == (
                provider, n, c, dtype, pass_):
            return row
    return None


def targets(run: Sequence[Dict[str, str]]) -> List[Tuple[str, str, str]]:
    """The kernel's GPU targets (issue 3) as (target, measurement, verdict: met / missed / not
    measured).

    Empty when the run holds none of the target cells (a CPU run, say)."""
    tri_big = _pick(run, "triton", 131072, 512, "bfloat16")
    tri_mid = _pick(run, "triton", 16384, 512, "bfloat16")
    tri_huge = _pick(run, "triton", 524288, 512, "bfloat16")
    if tri_big is None and tri_mid is None and tri_huge is None:
        return []

    def ok(row):
        return row is not None and row["status"] == "ok"

    out = []
    # Memory: peak growth of any pass at N = 131,072, C = 512, bf16 <= 4 x feats + 64 MiB.
    limit = 4 * 131072 * 512 * 2 / 2**20 + 64
    peaks = [_f(r, "peak_mem_mib") for r in (_pick(run, "triton", 131072, 512, "bfloat16", p)
                                              for p in PASSES) if ok(r)]
    peaks = [p for p in peaks if p is not None]
    out.append((f"memory: triton peak growth at N=131,072, C=512, bf16 <= {limit:.0f} MiB",
                f"{max(peaks):.0f} MiB" if peaks else "-",
                ("met" if max(peaks) <= limit else "missed") if peaks else "not measured"))
    share = _f(tri_big, "share_of_matmul") if ok(tri_big) else None
    out.append(("speed: triton fwd+bwd at N=131,072, C=512, bf16 >= 40 % of bf16 mm",
                f"{100 * share:.1f} % ({_f(tri_big, 'tflops'):.1f} TFLOP/s)" if share else "-",
                ("met" if share >= 0.40 else "missed") if share else "not measured"))
    for other, factor in (("reference", 5.0), ("compile", 2.0)):
        base = _pick(run, other, 16384, 512, "bfloat16")
        if ok(tri_mid) and ok(base):
            ratio = _f(base, "median_ms") / _f(tri_mid, "median_ms")
            measured, verdict = f"{ratio:.2f}x", "met" if ratio >= factor else "missed"
        else:
            why = base["status"] if base is not None and not ok(base) else "-"
            measured, verdict = why, "not measured"
        out.append((f"speed: triton fwd+bwd at N=16,384, C=512, bf16 >= {factor:g}x faster than "
                    f"{other}", measured, verdict))
    out.append(("scale: triton fwd+bwd at N=524,288, C=512, bf16 runs",
                f"{_ms(tri_huge)} ms" if ok(tri_huge) else (tri_huge or {}).get("status", "-"),
                "met" if ok(tri_huge) else "missed" if tri_huge is not None and
                tri_huge["status"].startswith(("OOM", "error")) else "not measured"))
    det = [r["deterministic"] for r in run if r["provider"] == "triton" and r["deterministic"]]
    out.append(("determinism: triton gradients bitwise equal over two runs",
                f"{det.count('yes')} of {len(det)} cells" if det else "-",
                ("met" if all(d == "yes" for d in det) else "missed") if det else "not measured"))
    return out


def run_markdown(run: Sequence[Dict[str, str]]) -> str:
    """One run's section: stamps, matmul rates, targets (GPU runs), the table."""
    first = run[0]
    rates = {}
    for row in run:
        if row["matmul_kind"]:
            rates[row["matmul_kind"]] = _f(row, "matmul_tflops")
    lines = [f"## {first['device']} · {first['date']} · rev {first['git_rev']}", "",
             f"torch {first['torch']}, triton {first['triton']}, torch CPU threads: "
             f"{first['threads']}. Matrix-multiply rate measured in this run: "
             + ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in sorted(rates.items())) + ".", ""]
    goals = targets(run)
    if goals:
        lines += ["| target (issue 3) | measured | verdict |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in goals]
        lines.append("")
    lines += ["| provider | N | C | dtype | r | fwd ms | bwd ms | fwd+bwd ms | peak MiB fwd / bwd / "
              "fwd+bwd | TFLOP/s | % mm | det. | timer | status |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for (provider, n, c, dtype), passes in _cells(run).items():
        full = passes.get("full")
        tflops = _f(full, "tflops") if full else None
        share = _f(full, "share_of_matmul") if full else None
        any_row = next(iter(passes.values()))
        lines.append("| " + " | ".join([
            provider, f"{n:,}", str(c), dtype, any_row["pair_fraction"] or "-",
            _ms(passes.get("fwd")), _ms(passes.get("bwd")), _ms(full, spread=True),
            " / ".join(_mib(passes.get(p)) for p in PASSES),
            "-" if tflops is None else f"{tflops:.3g}",
            "-" if share is None else f"{100 * share:.1f}",
            (full or {}).get("deterministic") or "-",
            (full or any_row).get("timer") or "-",
            _status(passes) + (f" ({any_row['note']})" if any_row["note"] else ""),
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Dict[str, str]], path: Path) -> None:
    """Every run of the CSV, newest first."""
    parts = ["# pixel_infonce benchmark", "",
             "Written by `python -m bench.bench_pixel_infonce` from `pixel_infonce.csv` (one section "
             "per run, newest first). See bench/NOTES.md for the kernel versions.", "",
             INPUTS_NOTE, "",
             "Times: median in ms, fwd+bwd with [p20, p80]. Memory: peak growth above the inputs "
             "in MiB (CUDA: max_memory_allocated; CPU: peak RSS). TFLOP/s: useful 6 r N^2 C over "
             "the fwd+bwd median; % mm: its share of the matmul rate of the row's dtype (float32: "
             "TF32 on CUDA). det.: two forward + backward passes give bitwise equal gradients.", ""]
    parts += [run_markdown(run) for run in group_runs(rows)]
    Path(path).write_text("\n".join(parts))


def latest_on_device(rows: Sequence[Dict[str, str]], device: str) -> List[Dict[str, str]]:
    """The newest row of each (provider, N, C, dtype, pass) measured on `device`."""
    latest: Dict[tuple, Dict[str, str]] = {}
    for row in sorted((r for r in rows if r["device"] == device), key=lambda r: r["date"]):
        latest[tuple(row[k] for k in ("provider", "n", "c", "dtype", "pass"))] = row
    return list(latest.values())


def write_plot(run: Sequence[Dict[str, str]], path: Path) -> None:
    """Time and peak memory of forward + backward against N, log-log, one line per provider and
    one column per (C, dtype) in `run` (rows of one device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = sorted({(int(r["c"]), r["dtype"]) for r in run})
    fig, axes = plt.subplots(2, len(panels), figsize=(max(6.0, 4.2 * len(panels)), 7.5),
                             squeeze=False)
    colours = dict(zip(PROVIDERS, ("tab:gray", "tab:blue", "tab:red", "tab:green")))
    for col, (c, dtype) in enumerate(panels):
        for provider in PROVIDERS:
            points = sorted((int(r["n"]), _f(r, "median_ms"), _f(r, "peak_mem_mib")) for r in run
                            if r["provider"] == provider and int(r["c"]) == c and r["dtype"] == dtype
                            and r["pass"] == "full" and r["status"] == "ok"
                            and r["note"] != INTERPRETER_NOTE)
            if not points:
                continue
            ns = [p[0] for p in points]
            axes[0][col].plot(ns, [p[1] for p in points], "o-", color=colours[provider], label=provider)
            mem = [(p[0], p[2]) for p in points if p[2] is not None and p[2] > 0]
            if mem:
                axes[1][col].plot(*zip(*mem), "o-", color=colours[provider], label=provider)
        axes[0][col].set_title(f"C={c}, {dtype}")
        axes[0][col].set_ylabel("fwd+bwd median (ms)")
        axes[1][col].set_ylabel("peak memory growth (MiB)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("N (pixels)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    dates = sorted({r["date"] for r in run})
    revs = ", ".join(sorted({r["git_rev"] for r in run}))
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    fig.suptitle(f"pixel_infonce fwd+bwd: {run[0]['device']}\n{when}, rev {revs}\n"
                 "(Triton interpreter runs not plotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(run: Sequence[Dict[str, str]]) -> str:
    """A short text table: the targets (GPU runs) and the forward + backward rows (on a GPU, the
    C = 512 bfloat16 slice only)."""
    lines = []
    goals = targets(run)
    if goals:
        width = max(len(t) for t, _, _ in goals)
        lines += [f"{t:<{width}}  {m:>24}  {v}" for t, m, v in goals] + [""]
    full = [r for r in run if r["pass"] == "full"]
    slice_ = [r for r in full if r["c"] == "512" and r["dtype"] == "bfloat16"]
    if slice_:
        full = slice_
        lines.append("fwd+bwd, C=512 bfloat16 (all cells in pixel_infonce.md):")
    lines.append(f"{'provider':<10} {'N':>8} {'C':>4} {'dtype':<9} {'ms':>10} {'MiB':>8} "
                 f"{'TFLOP/s':>8} {'%mm':>6}  status")
    for row in sorted(full, key=lambda r: (int(r["c"]), r["dtype"], int(r["n"]), r["provider"])):
        share = _f(row, "share_of_matmul")
        lines.append(f"{row['provider']:<10} {int(row['n']):>8} {row['c']:>4} {row['dtype']:<9} "
                     f"{_ms(row):>10} {_mib(row):>8} {row['tflops'] or '-':>8} "
                     f"{'-' if share is None else f'{100 * share:.1f}':>6}  {row['status']}"
                     + (" (interpreter)" if row["note"] == INTERPRETER_NOTE else ""))
    return "\n".join(lines)


def variants_summary(run: Sequence[Dict[str, str]]) -> str:
    """The launch-variant comparison of a run: every "triton:<variant>" cell with its fwd, bwd and
    fwd+bwd medians, and per (N, C, dtype) the fastest fwd+bwd with its speed-up over the default
    preset ("resident") when that ran too."""
    rows = [r for r in run if r["provider"].startswith("triton:")]
    if not rows:
        return "no launch-variant rows in this run"
    lines = ["== launch variants (kernels.triton_infonce.VARIANTS): medians in ms, fwd+bwd "
             "TFLOP/s and % of the matmul rate, peak MiB of fwd+bwd",
             f"{'variant':<21} {'N':>8} {'C':>4} {'dtype':<9} {'fwd':>9} {'bwd':>9} "
             f"{'fwd+bwd':>9} {'TFLOP/s':>8} {'%mm':>6} {'MiB':>7} {'det':>4}  status"]
    verdicts = []
    for (provider_n_c_d, passes) in _cells(rows).items():
        provider, n, c, dtype = provider_n_c_d
        full = passes.get("full")
        share = _f(full, "share_of_matmul") if full else None
        lines.append(f"{provider:<21} {n:>8} {c:>4} {dtype:<9} {_ms(passes.get('fwd')):>9} "
                     f"{_ms(passes.get('bwd')):>9} {_ms(full):>9} "
                     f"{(full or {}).get('tflops') or '-':>8} "
                     f"{'-' if share is None else f'{100 * share:.1f}':>6} {_mib(full):>7} "
                     f"{(full or {}).get('deterministic') or '-':>4}  {_status(passes)}")
    groups = sorted({(int(r["n"]), int(r["c"]), r["dtype"]) for r in rows})
    for n, c, dtype in groups:
        timed = {r["provider"]: _f(r, "median_ms") for r in rows
                 if (int(r["n"]), int(r["c"]), r["dtype"], r["pass"]) == (n, c, dtype, "full")
                 and r["status"] == "ok" and _f(r, "median_ms")}
        if not timed:
            continue
        best = min(timed, key=timed.get)
        base = timed.get("triton:resident")
        ratio = f", {base / timed[best]:.2f}x resident" if base and best != "triton:resident" else ""
        verdicts.append(f"fastest fwd+bwd at N={n:,}, C={c}, {dtype}: {best} "
                        f"({_num(timed[best])} ms{ratio})")
    return "\n".join(lines + verdicts)


def merge_rows(source: Path, target: Path) -> int:
    """Append the rows of `source` (a results CSV) that `target` does not hold yet; return how many
    (`bench.utils.merge_rows` keyed on the run and the cell)."""
    return utils_merge_rows(source, target, COLUMNS,
                            ("date", "device", "git_rev", "provider", "n", "c", "dtype", "pass"))


def write_reports(out: Path) -> List[Dict[str, str]]:
    """Rebuild the Markdown (all runs) and the plot (the newest run's device) from OUT's CSV;
    return the newest run."""
    rows = read_rows(out / CSV_NAME)
    if not rows:
        raise ValueError(f"{out / CSV_NAME} holds no rows")
    write_markdown(rows, out / MD_NAME)
    newest = group_runs(rows)[0]
    write_plot(latest_on_device(rows, newest[0]["device"]), out / PNG_NAME)
    return newest


def progress_line(row: Dict[str, object]) -> str:
    """One measured row in a line, as a run prints it."""
    return (f"{row['provider']} N={row['n']} C={row['c']} {row['dtype']} {row['pass']}: "
            f"{_ms(row, spread=True)} ms, {_mib(row)} MiB, {row.get('tflops') or '-'} TFLOP/s, "
            f"det {row.get('deterministic') or '-'}, {row['status']}")
