"""`fastfat data convert` and `fastfat data check`: FFCV .beton files for a data set.

convert reads what load_dataset reads (torchvision's CIFAR files under --data-root, or the
bundled digits) and writes OUT/<name>_train.beton and OUT/<name>_test.beton (data.beton_paths),
raw pixels, so the FFCV loader serves exactly the images the memory loader serves.
check validates both files of a data set the way the FFCV loader does before training.
"""
from __future__ import annotations

import os

from .data import beton_paths, dataset_info, load_dataset
from .errors import UserError
from .ffcv_data import check_beton, require_ffcv, write_betons  # ffcv itself loads lazily


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare data sets (FFCV .beton files)",
                              description="Prepare data sets for the FFCV loader.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = sub.add_parser("convert", help="write <name>_train.beton and <name>_test.beton",
                       description="Convert a data set to FFCV .beton files (raw pixels).")
    c.add_argument("--dataset", required=True, help="cifar10 | cifar100 | digits (or synthetic)")
    c.add_argument("--out", required=True, help="directory for the .beton files")
    c.add_argument("--data-root", default="data", help="where the source files are (default: data)")
    c.add_argument("--download", action="store_true", help="download the source files if missing")
    c.add_argument("--force", action="store_true", help="overwrite existing .beton files")
    c.add_argument("--workers", type=int, default=1, help="writer processes (default: 1)")
    c.set_defaults(func=run_convert)

    k = sub.add_parser("check", help="validate a data set's .beton files",
                       description="Check that <name>_{train,test}.beton are complete and fit the data set.")
    k.add_argument("--dataset", required=True)
    k.add_argument("--data-root", default="data", help="directory holding the .beton files")
    k.set_defaults(func=run_check)


def _describe(path, b) -> str:
    h, w, c = b.shape
    return f"{path}: {b.num_samples} images {h}x{w}x{c}, labels {b.label_min}..{b.label_max}"


def run_convert(args) -> int:
    info = dataset_info(args.dataset)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    require_ffcv("fastfat data convert")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} exists and is not a directory")
    paths = beton_paths(args.out, info.name)
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.force:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    train, test = load_dataset(info.name, args.data_root, args.download)
    os.makedirs(args.out, exist_ok=True)
    write_betons([(paths[0], train), (paths[1], test)], num_workers=args.workers)
    for p in paths:  # read back what was written, as the loader will
        print("wrote " + _describe(p, check_beton(p, info)))
    return 0


def run_check(args) -> int:
    info = dataset_info(args.dataset)
    require_ffcv("fastfat data check")
    for p in beton_paths(args.data_root, info.name):
        print("ok " + _describe(p, check_beton(p, info)))
    return 0
