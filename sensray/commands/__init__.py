"""Commands that exist only under `sensray` (`run`, `list`); the others live beside what they run
(sensray/sweep.py, sensray/prune.py, ...). sensray/cli.py registers them all."""
