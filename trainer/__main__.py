"""`python -m trainer`: the same CLI as the `trainer` console script."""

from trainer.cli import main

raise SystemExit(main())
