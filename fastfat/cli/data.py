"""`fastfat data convert` and `fastfat data check`: FFCV .beton files for a data set."""
from __future__ import annotations

from ..data.convert import check, convert


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare data sets (FFCV .beton files)",
                              description="Prepare data sets for the FFCV loader.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = sub.add_parser("convert", help="write <name>_train.beton and <name>_test.beton",
                       description="Convert a data set to FFCV .beton files (raw pixels).")
    c.add_argument("--dataset", required=True, help="cifar10 | cifar100 | fashion-mnist | mnist | svhn | stl10 | digits (or synthetic)")
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
    for path, b in convert(args.dataset, args.out, data_root=args.data_root, download=args.download,
                           force=args.force, workers=args.workers):
        print("wrote " + _describe(path, b))
    return 0


def run_check(args) -> int:
    for path, b in check(args.dataset, args.data_root):
        print("ok " + _describe(path, b))
    return 0
