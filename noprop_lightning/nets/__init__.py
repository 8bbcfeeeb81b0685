from noprop_lightning.nets.blocks import (
    ClassifierHead,
    DenoisingBlock,
    ResidualLabelPath,
    build_block,
    build_blocks,
    denoise,
)
from noprop_lightning.nets.embeddings import LabelEmbedding, class_medoids, resolve_embed_dim
from noprop_lightning.nets.encoders import ConvEncoder, MLPEncoder, build_encoder, import_encoder
from noprop_lightning.nets.network import BlockNetwork, NetworkSettings, TimeNetwork
from noprop_lightning.nets.placement import NotHeld, blocks_deferred, deferred_blocks
from noprop_lightning.nets.size import check_blocks_fit
from noprop_lightning.nets.time_blocks import TimeConditionedBlock, sinusoidal_time_embedding

__all__ = [
    "BlockNetwork",
    "ClassifierHead",
    "ConvEncoder",
    "DenoisingBlock",
    "LabelEmbedding",
    "MLPEncoder",
    "NetworkSettings",
    "NotHeld",
    "ResidualLabelPath",
    "TimeConditionedBlock",
    "TimeNetwork",
    "blocks_deferred",
    "build_block",
    "build_blocks",
    "build_encoder",
    "check_blocks_fit",
    "class_medoids",
    "deferred_blocks",
    "denoise",
    "import_encoder",
    "resolve_embed_dim",
    "sinusoidal_time_embedding",
]
