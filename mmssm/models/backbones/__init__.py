from .base import SSMBackbone
from .convnext_s4nd import ConvNeXtS4ND, ConvNeXtS4ND3D

__all__ = ['SSMBackbone', 'ConvNeXtS4ND', 'ConvNeXtS4ND3D']
