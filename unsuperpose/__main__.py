from unsuperpose.cli import main

raise SystemExit(main())
