"""The offline demo: tiny teacher and student on the synthetic task, OPD vs KAT-OPD."""

from kat_research.demo.models import demo_model, demo_model_info, train_sft_model

__all__ = ["demo_model", "demo_model_info", "train_sft_model"]
