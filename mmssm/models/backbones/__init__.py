from .base import SSMBackbone
from .convnext_s4nd import ConvNeXtS4ND, ConvNeXtS4ND3D
from .v2m import V2M
from .v2m_pyramid import V2MPyramid
from .vim import Vim
from .vmamba import VMamba

__all__ = ['SSMBackbone', 'Vim', 'V2M', 'VMamba', 'V2MPyramid', 'ConvNeXtS4ND', 'ConvNeXtS4ND3D']
