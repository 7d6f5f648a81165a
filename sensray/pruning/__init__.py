"""What pruning needs beyond the mask itself: calibration activations and per-layer sparsity budgets.

    calibration.py   input activation norms per linear layer (Wanda), measured once per model
    allocation.py    per-tensor sparsities from a finished run's sensitivities (method `sensitivity`)

The `prune` perturbation kind is `sensray/perturbations/prune.py`; exporting a pruned model
is `python -m sensray.prune` (`sensray/prune.py`).
"""
