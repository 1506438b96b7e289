"""``python -m benchmarks.cka``: see :mod:`benchmarks.cka.cli`."""
import sys

from benchmarks.cka.cli import main

sys.exit(main())
