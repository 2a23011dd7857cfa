"""The model: timm/transformers towers (:mod:`.encoders`) and MLIP's heads and divergence encoder (:mod:`.mlip`)."""

from mlip_core.model.encoders import ImageFeatures, ImageTower, TextFeatures, TextTower, build_tokenizer
from mlip_core.model.mlip import MLIP, ProjectionHead, embed_entities
from mlip_core.objective import FusionHead

__all__ = [
    "MLIP",
    "FusionHead",
    "ImageFeatures",
    "ImageTower",
    "ProjectionHead",
    "TextFeatures",
    "TextTower",
    "build_tokenizer",
    "embed_entities",
]
