from clmtune.cli import main

raise SystemExit(main())
