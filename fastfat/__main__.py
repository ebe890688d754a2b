"""python -m fastfat: the `fastfat` command (fastfat.cli)."""
import sys

from .cli import main

sys.exit(main())
