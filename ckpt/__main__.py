from ckpt.cli import main

raise SystemExit(main())
