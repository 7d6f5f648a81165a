"""Executors move trials to replicas and rows back; they never touch a model themselves."""
