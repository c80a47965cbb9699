"""Who trains next and for how long: `Schedule` (policy.py: after each epoch, go on or stop;
which candidate is promoted next; when a worker stops) over small modules that each hold one
part of the policy: the rung ladder (rungs.py), successive halving's ranking (ranking.py), the
endgame's parity across the front (endgame.py), the budget split (budget.py), continuation
bookkeeping (continuation.py) and the Pareto-aware pruner's rule (pruner.py). No training;
reads the study through the record.
"""
