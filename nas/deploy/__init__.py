"""From the front to a deployed model: loading an exported folder (`nas.load`), saved
probability maps, and the workflows of `nas export`, `nas predict` and `nas ensemble`.
May import every package below nas.evaluation (nas.search included: export picks from the front).
"""
