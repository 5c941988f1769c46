"""``python -m curdkv``: the same command as ``curdkv`` (what ``torchrun -m curdkv`` runs)."""

from .cli.main import main

raise SystemExit(main())
