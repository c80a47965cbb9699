"""What the chosen networks are worth beyond the search: front members retrained at full
budget (retrain, retrain_plan, all_cases), cross-validated on every fold (crossval,
crossval_run), ensembled out of fold (member_ensemble), scored on held-out cases as their
exports segment them (heldout), and a folder of masks scored against labels (masks).
May import every package but nas.commands.
"""
