"""``python -m benchmarks.leaderboard``: see :mod:`benchmarks.leaderboard.cli`."""
from benchmarks.leaderboard.cli import main

raise SystemExit(main())
