"""Ablation suites: a baseline and variants trained over the same seeds, compared with statistics."""
