from .checkpoint import (load_backbone_weights, load_pretrained,
                         read_checkpoint, strip_prefix, unwrap_state_dict)

__all__ = ['load_backbone_weights', 'load_pretrained', 'read_checkpoint',
           'strip_prefix', 'unwrap_state_dict']
