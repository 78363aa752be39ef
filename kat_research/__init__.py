"""kat-research: on-policy distillation with KAT termination and Top-K truncated reverse KL."""

__version__ = "0.1.0"
