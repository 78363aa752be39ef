"""Reproduction sweeps: specs (experiments/*.yaml) expanded into jobs, job folders and their
states, running one job, and launchers. The command line is ``python -m kat_research.reproduce``."""
