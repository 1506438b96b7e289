"""``python -m benchmarks.grid GRID.yaml ...``: see :mod:`benchmarks.grid.cli`."""
from benchmarks.grid.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
