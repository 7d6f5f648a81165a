"""python -m sensray.saliency: the same as `sensray saliency`."""

import sys

from sensray.saliency.cli import main

sys.exit(main())
