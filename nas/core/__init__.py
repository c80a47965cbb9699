"""Foundations every step stands on: `NasError` (a user mistake, one line, exit 2), storage
passwords hidden in all output, the one YAML reader, writing by temporary name and rename,
file locks, and what the host has (cores, memory) with the one guard of an allocation input
sizes. Imports nothing of nas; no torch.
"""
