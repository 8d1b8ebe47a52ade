from bench.privacy.cli import main

raise SystemExit(main())
