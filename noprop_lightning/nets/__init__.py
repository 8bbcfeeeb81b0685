from noprop_lightning.nets.blocks import DenoisingBlock, ResidualLabelPath, build_blocks, denoise
from noprop_lightning.nets.embeddings import LabelEmbedding, class_medoids, resolve_embed_dim
from noprop_lightning.nets.encoders import ConvEncoder, MLPEncoder, build_encoder

__all__ = [
    "ConvEncoder",
    "DenoisingBlock",
    "LabelEmbedding",
    "MLPEncoder",
    "ResidualLabelPath",
    "build_blocks",
    "build_encoder",
    "class_medoids",
    "denoise",
    "resolve_embed_dim",
]
