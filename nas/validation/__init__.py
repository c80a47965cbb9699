"""How good a segmentation is: per-case metrics (Dice, IoU, HD95, NSD, volumes), the
largest-component postprocessing and nnU-Net's rule for it, and validation during training
(fixed patches for decisions, whole volumes through nas.network.windows). No Optuna.
May import nas.core, nas.data and nas.network.
"""
