"""python -m sensray.attack: the same as `sensray attack`."""

import sys

from sensray.attack.cli import main

sys.exit(main())
