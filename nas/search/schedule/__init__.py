"""Who trains next and for how long: `Schedule` (after each epoch: go on or stop; which
candidate is promoted next) over fidelity (rungs, ranking, the endgame, the budget split) and
the Pareto-aware pruner. No training; reads the study through the record.
"""
