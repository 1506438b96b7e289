from scd.cli import main

raise SystemExit(main())
