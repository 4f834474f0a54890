from bilevel_jax.cli import main

raise SystemExit(main())
