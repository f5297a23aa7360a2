from influencespace.cli import main

raise SystemExit(main())
