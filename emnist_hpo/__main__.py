from emnist_hpo.cli import main

raise SystemExit(main())
