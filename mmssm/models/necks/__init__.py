from .feature_select import SelectFeature
from .simple_pyramid import SimplePyramid

__all__ = ['SimplePyramid', 'SelectFeature']
