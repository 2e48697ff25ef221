"""Mixers and blocks shared by the backbones."""
from .ss2d import SS2D
from .vss_block import VSSBlock
