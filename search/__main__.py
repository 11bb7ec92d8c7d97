"""``python -m search``: the ``search`` command line."""

from search.cli import main

raise SystemExit(main())
