"""Training one network: its frozen `TrainConfig`, the losses (deep supervision included),
batches built in background workers, the loop (`fit`), and long runs in resumable segments
between checkpoints. No Optuna.
May import nas.core, nas.data, nas.network and nas.validation.
"""
