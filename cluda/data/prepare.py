"""Prepare a data set for training: write train id labels and the class statistics that rare class
sampling reads (as DAFormer's `tools/convert_datasets/{gta,synthia,cityscapes}.py`).

    python -m cluda.data.prepare {gta,synthia,cityscapes} ROOT [--workers K]
    python -m cluda.data.prepare {gta,synthia,cityscapes} ROOT --check [--strict]

For each raw label it writes `<stem>_labelTrainIds.png` beside it (Cityscapes:
`<base>_gtFine_labelTrainIds.png`, the official name), 8-bit, 0..18 and 255 = ignore; then
`ROOT/class_stats.json` with the per-image class pixel counts and the overall class frequencies
(Cityscapes: of the train split; val labels are converted too).

Safe to rerun and to interrupt: every file is written to a temporary name and renamed into place,
a train id file that already exists and decodes to a valid label of the right size is kept (its
counts are read back from it), and the JSON is written last.

`--check` (`check`) writes nothing: it decodes every image and every label file the loaders
would read (the prepared train id file where there is one, the raw label otherwise) with the
loaders' own readers and lists, one line per file on stdout:

- `unreadable`: a file that cannot be decoded (truncated, not an image, a 16-bit image holding only
  8-bit values ...). Training would stop at it, so any makes the exit status 2.
- `size`: a label whose size differs from its image's. The loaders resize the label (nearest),
  as a handful of GTA5's pairs need, so this is a warning.
- `unknown ids`: label pixels whose ids the data set does not define; the loaders set them to
  ignore (255), so this is a warning.

With `--strict` the warnings make the exit status 2 too. Listing errors (an image without its
label, a missing folder) stop the check at once, naming the file.
"""
import argparse
import glob
import multiprocessing
import os
import sys
import warnings

import numpy as np
from PIL import Image

from cluda.errors import EXIT_STATUS_HELP, DataError, describe, is_user_error, run_cli

from .datasets import (CITYSCAPES_MAPPING, CS_PREPARED_SUFFIX, CS_RAW_SUFFIX, SYNTHIA_MAPPING,
                       TRAINID_MAPPING, TRAINID_SUFFIX, list_samples)
from .io import read_image, read_label, write_png_atomic
from .labels import IGNORE_INDEX, NUM_CLASSES
from .rcs import STATS_FILE, class_counts, save_class_stats, summarize_stats

_MAPPINGS = {"gta": CITYSCAPES_MAPPING, "cityscapes": CITYSCAPES_MAPPING,
             "synthia": SYNTHIA_MAPPING}
_VALID = np.zeros(256, dtype=bool)
_VALID[:NUM_CLASSES] = True
_VALID[IGNORE_INDEX] = True


def prepared_path(raw_path):
    """Where the train id label of a raw label file goes."""
    if raw_path.endswith(CS_RAW_SUFFIX):
        return raw_path[:-len(CS_RAW_SUFFIX)] + CS_PREPARED_SUFFIX
    if not raw_path.endswith(".png"):
        raise ValueError(f"raw label {raw_path} is not a .png file")
    return raw_path[:-4] + TRAINID_SUFFIX


def _existing_valid(out_path, raw_path):
    """The train ids of an already prepared file, or None when it is missing or not valid
    (unreadable, truncated, wrong mode, size differing from the raw label, unknown values)."""
    if not os.path.isfile(out_path):
        return None
    try:
        with Image.open(out_path) as img:
            img.load()
            if img.mode != "L":
                return None
            label = np.asarray(img)
        with Image.open(raw_path) as raw:  # header only: the size
            raw_size = raw.size
    except Exception:
        return None
    if (label.shape[1], label.shape[0]) != raw_size or not _VALID[label].all():
        return None
    return label


def prepare_one(task):
    """Convert one label (a pool task).

    Args:
        task: (name, raw label path, data set kind, record counts).
    Returns:
        (name, (19,) counts or None, unknown pixel count, unknown ids, "written" | "kept").
    """
    name, raw_path, kind, record = task
    out_path = prepared_path(raw_path)
    label = _existing_valid(out_path, raw_path)
    n_unknown, unknown_ids, status = 0, [], "kept"
    if label is None:
        label, n_unknown, unknown_ids = _MAPPINGS[kind].apply(read_label(raw_path), raw_path)
        write_png_atomic(out_path, label)
        status = "written"
    counts = [int(v) for v in class_counts(label)] if record else None
    return name, counts, n_unknown, unknown_ids, status


def _remove_stale_temporaries(folders):
    """Temporary files an interrupted run left behind (`.<file>.<random>.tmp`)."""
    for folder in folders:
        for tmp in glob.glob(os.path.join(folder, ".*_labelTrainIds.png.*.tmp")):
            os.remove(tmp)
        for tmp in glob.glob(os.path.join(folder, "." + STATS_FILE + ".*.tmp")):
            os.remove(tmp)


def prepare(dataset, root, *, workers=0, splits=("train", "val"), progress=True):
    """Write train id labels and `ROOT/class_stats.json` for one data set.

    Args:
        dataset: "gta", "synthia" or "cityscapes".
        root: the data set's root folder (official layout).
        workers: worker processes (0: in this process).
        splits: Cityscapes splits to convert; the statistics cover "train" (or the first split).
        progress: show a tqdm bar.
    Returns:
        dict with the statistics path and the numbers of files written and kept.
    """
    if dataset not in _MAPPINGS:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {sorted(_MAPPINGS)}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if dataset == "cityscapes":
        if not splits:
            raise ValueError("give at least one Cityscapes split")
        stats_split = "train" if "train" in splits else splits[0]
        groups = [(s, list_samples(dataset, root, split=s, labels="raw")) for s in splits]
    else:
        stats_split = None
        groups = [(None, list_samples(dataset, root, labels="raw"))]
    tasks = [(name, label_path, dataset, split == stats_split)
             for split, samples in groups for name, _, label_path, _ in samples]
    _remove_stale_temporaries({os.path.dirname(t[1]) for t in tasks} | {root})

    per_image, unknown_files, unknown_pixels, unknown_ids = {}, [], 0, set()
    done = {"written": 0, "kept": 0}
    if workers > 0:
        pool = multiprocessing.get_context("fork").Pool(workers)
        chunk = max(1, min(16, len(tasks) // (4 * workers)))
        results = pool.imap_unordered(prepare_one, tasks, chunksize=chunk)
    else:
        pool, results = None, map(prepare_one, tasks)
    try:
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(tasks), desc=f"prepare {dataset}", unit="label")
        for name, counts, n_unknown, ids, status in results:
            done[status] += 1
            if counts is not None:
                per_image[name] = counts
            if n_unknown:
                unknown_files.append(name)
                unknown_pixels += n_unknown
                unknown_ids.update(ids)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if unknown_files:
        warnings.warn(f"{len(unknown_files)} labels of {root} hold {unknown_pixels} pixels with "
                      f"unknown ids {sorted(unknown_ids)[:20]} (first: {unknown_files[0]}); "
                      f"they were set to ignore ({IGNORE_INDEX})", stacklevel=2)
    stats = summarize_stats(per_image, dataset=dataset, split=stats_split)
    stats_path = os.path.join(root, STATS_FILE)
    save_class_stats(stats, stats_path)  # last: its presence means every label is in place
    return {"stats": stats_path, "written": done["written"], "kept": done["kept"],
            "unknown_files": len(unknown_files)}


# Mapping objects hold 65536-entry tables: pool tasks name them instead of pickling them.
_MAPPING_BY_KEY = {"cityscapes": CITYSCAPES_MAPPING, "synthia": SYNTHIA_MAPPING,
                   "trainids": TRAINID_MAPPING}


def _mapping_key(mapping):
    return next(k for k, m in _MAPPING_BY_KEY.items() if m is mapping)


def _read_or_note(reader, path, findings):
    """reader(path), or None after adding an "unreadable" finding (user errors only: a bug
    in the reader still raises)."""
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is about the file
        if not is_user_error(err):
            raise
        findings.append(("unreadable", describe(err)))
        return None


def check_one(task):
    """Check one sample (a pool task).

    Args:
        task: (image path, label path, mapping key of `_MAPPING_BY_KEY`).
    Returns:
        [(kind, message)] with kind "unreadable", "size" or "unknown ids"; empty if all is well.
    """
    img_path, label_path, key = task
    mapping = _MAPPING_BY_KEY[key]
    findings = []
    img = _read_or_note(read_image, img_path, findings)
    ids = _read_or_note(read_label, label_path, findings)
    if ids is not None:
        _, n_unknown, unknown = mapping.apply(ids, label_path)
        if n_unknown:
            findings.append(("unknown ids", f"{label_path}: {n_unknown} pixels with ids "
                             f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} unknown to "
                             f"{mapping.name} (the loaders set them to ignore)"))
        if img is not None and ids.shape != img.shape[:2]:
            findings.append(("size", f"label {label_path} is {ids.shape[1]}x{ids.shape[0]} but "
                             f"image {img_path} is {img.shape[1]}x{img.shape[0]} (the loaders "
                             "resize the label, nearest)"))
    return findings


def check(dataset, root, *, workers=0, splits=("train", "val"), strict=False, progress=True,
          out=None):
    """Read every image and label of a data set as the loaders would and report, by name, the
    files that are unreadable, labels whose size differs from their image's and labels with ids
    the data set does not define (see the module docstring). Writes nothing.

    Args:
        dataset: "gta", "synthia" or "cityscapes".
        root: the data set's root folder (official layout).
        workers: worker processes (0: in this process).
        splits: Cityscapes splits to check.
        strict: size mismatches and unknown ids count as problems too.
        progress: show a tqdm bar.
        out: where the report lines go (default stdout).

    Returns:
        {"samples": int, "unreadable": int, "size": int, "unknown ids": int} (files per kind).

    Raises:
        DataError: any unreadable file (or, with `strict`, any finding), after the report.
        FileNotFoundError: a listing problem (missing folder, an image without its label ...).
    """
    if dataset not in _MAPPINGS:
        raise ValueError(f"unknown data set {dataset!r}: expected one of {sorted(_MAPPINGS)}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    out = sys.stdout if out is None else out
    if dataset == "cityscapes":
        samples = [s for split in splits for s in list_samples(dataset, root, split=split)]
    else:
        samples = list_samples(dataset, root)
    tasks = [(img, label, _mapping_key(m)) for _, img, label, m in samples]
    counts = {"samples": len(tasks), "unreadable": 0, "size": 0, "unknown ids": 0}
    if workers > 0:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(check_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))
    else:
        pool, results = None, map(check_one, tasks)
    first = {}
    try:
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(tasks), desc=f"check {dataset}", unit="sample")
        for findings in results:
            for kind, message in findings:
                counts[kind] += 1
                first.setdefault(kind, message)
                print(f"{kind + ':':13s}{message}", file=out, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    summary = (f"checked {counts['samples']} samples of {dataset} at {root}: "
               f"{counts['unreadable']} unreadable file(s), {counts['size']} label(s) of another "
               f"size than their image, {counts['unknown ids']} label(s) with unknown ids")
    print(summary, file=out, flush=True)
    if counts["unreadable"]:
        raise DataError(f"{counts['unreadable']} unreadable file(s) in {root} (listed above); "
                        f"the first: {first['unreadable']}")
    if strict and (counts["size"] or counts["unknown ids"]):
        kind = "size" if counts["size"] else "unknown ids"
        raise DataError(f"--strict: {counts['size']} size mismatches and {counts['unknown ids']} "
                        f"labels with unknown ids in {root} (listed above); the first: "
                        f"{first[kind]}")
    return counts


def main(argv=None):
    """`python -m cluda.data.prepare`; see `--help`. Returns the exit status: 0, or 2 after a
    user error (one line on stderr, `cluda.errors.run_cli`)."""
    return run_cli(_main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m cluda.data.prepare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write train id labels (*_labelTrainIds.png) and ROOT/class_stats.json, or\n"
                    "with --check read every image and label and list the bad ones.",
        epilog="examples:\n"
               "  python -m cluda.data.prepare gta /data/gta --workers 8\n"
               "  python -m cluda.data.prepare cityscapes /data/cityscapes --check\n\n"
               + EXIT_STATUS_HELP)
    parser.add_argument("dataset", choices=sorted(_MAPPINGS))
    parser.add_argument("root", help="data set root in its official layout")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (0: none)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="Cityscapes splits to convert or check (statistics of 'train')")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; decode every image and label the loaders would read "
                             "and list unreadable files (exit status 2), labels of another size "
                             "than their image and labels with unknown ids (warnings)")
    parser.add_argument("--strict", action="store_true",
                        help="with --check: size mismatches and unknown ids make the exit "
                             "status 2 too")
    args = parser.parse_args(argv)
    if args.strict and not args.check:
        parser.error("--strict goes with --check")
    if args.check:
        check(args.dataset, args.root, workers=args.workers, splits=tuple(args.splits),
              strict=args.strict)
        return 0
    out = prepare(args.dataset, args.root, workers=args.workers, splits=tuple(args.splits))
    print(f"{out['written']} labels written, {out['kept']} kept; statistics in {out['stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
