"""Compute planning without weights: parameter counts, GPU memory and FLOPs of an OPD run
(``python -m kat_research.plan``; Table 2's compute estimate uses ``flops`` too)."""
