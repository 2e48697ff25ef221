"""Optimizer constructors, hooks and model wrappers."""
from .layer_decay import LayerDecayOptimWrapperConstructor
from .wrappers import CPUFriendlyDistributedDataParallel

__all__ = ['CPUFriendlyDistributedDataParallel', 'LayerDecayOptimWrapperConstructor']
