"""sensray: distributed weight-sensitivity sweeps for Hugging Face causal language models.

Each trial perturbs a resident model's weights in place, evaluates it, and restores the
weights bit-exactly, so one loaded replica serves thousands of trials.

    python -m sensray.sweep experiments/bitflip.yaml --executor local
"""

__version__ = "0.1.0"
