from .base import SSMBackbone
from .vim import Vim
from .vmamba import VMamba

__all__ = ['SSMBackbone', 'Vim', 'VMamba']
