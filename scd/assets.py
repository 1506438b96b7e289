"""`python -m scd.assets`: see :mod:`scd.core.assets`."""
from scd.core.assets import *  # noqa: F401,F403
from scd.core.assets import main

if __name__ == "__main__":
    raise SystemExit(main())
