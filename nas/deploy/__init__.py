"""From the front to a deployed model and back to masks: a member or an ensemble exported
as a model folder (export, export_study, programs, export_checks, readme), that folder loaded
(`nas.load`), scans segmented with it (predict), saved probability maps and their ensembles.
May import every package below nas.evaluation (nas.search included: export picks from the
front).
"""
