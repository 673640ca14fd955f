"""`python -m nextlat` runs the command line."""

from nextlat.cli import main

raise SystemExit(main())
