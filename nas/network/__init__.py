"""A U-Net as a network: its frozen config (`UNetConfig`), the builder (2D and 3D on one code
path), a description in words and numbers, its memory estimated from the config, the device
and precision it runs with, its weights read back checked, an export's model card, a volume
run window by window, and inference over windows (members, engines, mirroring). No Optuna,
no training loop.
May import nas.core and nas.data.
"""
