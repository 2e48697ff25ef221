from .base import SSMBackbone
from .vmamba import VMamba

__all__ = ['SSMBackbone', 'VMamba']
