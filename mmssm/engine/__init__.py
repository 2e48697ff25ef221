"""Optimizer constructors, hooks and model wrappers."""
from .amp import CPUAmpOptimWrapper
from .hooks import RNGStateHook
from .layer_decay import LayerDecayOptimWrapperConstructor
from .wrappers import CPUFriendlyDistributedDataParallel

__all__ = ['CPUAmpOptimWrapper', 'CPUFriendlyDistributedDataParallel',
           'LayerDecayOptimWrapperConstructor', 'RNGStateHook']
