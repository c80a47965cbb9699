"""What the chosen networks are worth beyond the search: front members retrained at full
budget, cross-validated on every fold, ensembled out of fold, scored on held-out cases as their
exports segment them, and a folder of masks scored against labels.
May import every package but nas.commands.
"""
