"""`python -m sensray.heal ...` is `sensray heal ...` (sensray/heal/cli.py)."""

import sys

from sensray.heal.cli import main

sys.exit(main())
