"""Model building: the testbed's shipped models and the stage chain that rebuilds them
(``conf/testbed_models.yaml``), SFT, the token mixtures they train on, and the ``model/*/demo``
presets' models trained on first use. Above ``lit`` (it trains with Lightning), below every
consumer of a model config."""

from kat_research.building.models import demo_model, demo_model_info, train_sft_model
from kat_research.building.testbed import shipped_model

__all__ = ["demo_model", "demo_model_info", "shipped_model", "train_sft_model"]
