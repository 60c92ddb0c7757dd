"""``python -m dpmsolver.cli`` (and ``torchrun -m dpmsolver.cli``)."""

from dpmsolver.cli import main

raise SystemExit(main())
