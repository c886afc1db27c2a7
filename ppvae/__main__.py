from ppvae.cli import main

raise SystemExit(main())
