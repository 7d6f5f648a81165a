"""python -m sensray COMMAND ...: the `sensray` command (sensray/cli.py)."""

import sys

from sensray.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sensray"))
