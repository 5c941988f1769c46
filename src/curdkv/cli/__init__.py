"""The ``curdkv`` command: ``main`` (the parser and dispatch), ``args`` (shared parsers and default
press lists), ``eval``, ``measure`` (bench and analyze) and ``demo``."""
