"""``python -m benchmarks.note_numbers [--check]``: see :mod:`benchmarks.note_numbers`."""
import sys

from benchmarks.note_numbers import main

sys.exit(main())
