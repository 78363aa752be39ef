"""One training job and the folder it runs in.

``job.train(cfg)`` is the job every entry point runs (the ``train`` CLI, sweep jobs, the demo):
it checks the config, claims the run folder, loads the models, fits and writes the summary.
``folder`` decides who owns a run folder (``run.json``, the ``run.lock`` held while a job runs),
which checkpoint a run resumes from, and keeps ``metrics.csv`` whole across resumes. File names
inside a folder live in :mod:`kat_research.layout`, which lower layers write through.
"""
