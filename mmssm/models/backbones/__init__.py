from .base import SSMBackbone
from .v2m import V2M
from .vim import Vim
from .v2m_pyramid import V2MPyramid
from .vmamba import VMamba

__all__ = ['SSMBackbone', 'Vim', 'V2M', 'VMamba', 'V2MPyramid']
