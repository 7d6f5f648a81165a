"""`python -m sensray.adversarial` = `sensray adversarial` (see sensray.adversarial.cli)."""

import sys

from sensray.adversarial.cli import main

sys.exit(main())
