"""The search: the space (YAML to `Candidate`), the Optuna study, its storage, sampler and
record of every trial and study attr, the objectives, measuring a candidate, one trial top to
bottom, the schedule that decides who trains next (`schedule/`), the front and its one score,
where a trial's files live (on every host), and the views derived from the study (CSVs, plots,
the report). May import nas.core, nas.data, nas.network, nas.validation and nas.training.
"""
