from edgellm.cli import main

raise SystemExit(main())
