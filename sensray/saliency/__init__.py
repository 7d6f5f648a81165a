"""Saliency: which weights, rows, tensors and bits would hurt most, for the whole model at once, from gradients.

    sensray saliency --model sensray-tiny
    sensray saliency --check results/bitflip/<run id>

gradients.py  one backward pass, each parameter's gradient consumed by a hook as it is made
scores.py     per-weight scores reduced on arrival: per-row sums, top elements, top flips per field
flips.py      every bit flip's new value and predicted loss change (shared with sensray.attack)
measure.py    the gradient pass + the Fisher window passes, timed, with their peak memory (memory.py)
probes.py     predictions for the exact perturbations of a finished sweep's trials
check.py      predicted against measured: the join and Spearman's rho per granularity
tables.py, figures.py, report.py, setup.py, cli.py   the command and what it writes
"""
