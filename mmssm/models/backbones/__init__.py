from .base import SSMBackbone

__all__ = ['SSMBackbone']
