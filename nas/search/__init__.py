"""The search: the space (YAML to `Candidate`: space_spec, space_file, draw), the Optuna
study, its storage, sampler and record of every trial and study attr, the objectives,
measuring a candidate, one trial top to bottom (trial, trial_start, trial_progress,
trial_outputs), the run of a search around it (run, run_setup, run_study, run_trials,
run_results, workers, interrupts, console, dry_run), the schedule that decides who trains
next (`schedule/`), the front and its one score, the choice of a member, where a trial's
files live on every host, and the views derived from the study (CSVs, plots, report.html),
served by the dashboard and the storage proxy (serving).
May import nas.core, nas.data, nas.network, nas.validation and nas.training.
"""
