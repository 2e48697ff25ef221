"""mmssm's registries: children of mmengine's roots, in their own ``mmssm`` scope.

Any mmpretrain, mmdet or mmseg config can say ``type='mmssm.V2M'``: mmengine then
imports ``mmssm.registry`` and the ``locations`` below by itself, so no
``custom_imports`` is needed, and nothing here imports mmdet or mmseg.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmssm',
                  locations=['mmssm.models'])
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS,
                          scope='mmssm', locations=['mmssm.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, scope='mmssm',
    locations=['mmssm.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmssm',
                          locations=['mmssm.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmssm',
                 locations=['mmssm.engine'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='mmssm',
                    locations=['mmssm.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='mmssm',
                      locations=['mmssm.datasets'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, scope='mmssm',
                   locations=['mmssm.evaluation'])
