from .base import SSMBackbone
from .vim import Vim

__all__ = ['SSMBackbone', 'Vim']
