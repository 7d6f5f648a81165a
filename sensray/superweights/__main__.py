"""python -m sensray.superweights: see sensray/superweights/cli.py."""

import sys

from sensray.superweights.cli import main

sys.exit(main())
