from .base import SSMBackbone
from .vim import Vim
from .v2m_pyramid import V2MPyramid
from .vmamba import VMamba

__all__ = ['SSMBackbone', 'Vim', 'VMamba', 'V2MPyramid']
