from lisplugin.cli import main

raise SystemExit(main())
