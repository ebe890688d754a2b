"""`python -m bench.gpu`: see bench/gpu/__init__.py."""
import sys

from . import main

sys.exit(main())
