"""``python -m index_builder``: the builder job (same options as ``advguard build``)."""

from index_builder.cli import main

raise SystemExit(main())
