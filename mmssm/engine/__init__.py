"""Optimizer constructors, hooks and model wrappers."""
from .wrappers import CPUFriendlyDistributedDataParallel

__all__ = ['CPUFriendlyDistributedDataParallel']
