from .base import SSMBackbone
from .v2m import V2M
from .vim import Vim

__all__ = ['SSMBackbone', 'Vim', 'V2M']
