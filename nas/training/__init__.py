"""Training one network: its frozen `TrainConfig`, the losses (deep supervision included),
batches built in background workers, the network a run starts from, the loop (`fit`), the
memory one step needs, and long runs in resumable segments between checkpoints. No Optuna.
May import nas.core, nas.data, nas.network and nas.validation.
"""
