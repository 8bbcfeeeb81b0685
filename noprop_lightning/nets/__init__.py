from noprop_lightning.nets.blocks import (
    ClassifierHead,
    DenoisingBlock,
    ResidualLabelPath,
    build_blocks,
    denoise,
)
from noprop_lightning.nets.embeddings import LabelEmbedding, class_medoids, resolve_embed_dim
from noprop_lightning.nets.encoders import ConvEncoder, MLPEncoder, build_encoder
from noprop_lightning.nets.time_blocks import TimeConditionedBlock, sinusoidal_time_embedding

__all__ = [
    "ClassifierHead",
    "ConvEncoder",
    "DenoisingBlock",
    "LabelEmbedding",
    "MLPEncoder",
    "ResidualLabelPath",
    "TimeConditionedBlock",
    "build_blocks",
    "build_encoder",
    "class_medoids",
    "denoise",
    "resolve_embed_dim",
    "sinusoidal_time_embedding",
]
