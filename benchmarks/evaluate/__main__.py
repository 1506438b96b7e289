"""``python -m benchmarks.evaluate``: see :mod:`benchmarks.evaluate.cli`."""
from benchmarks.evaluate.cli import main

raise SystemExit(main())
