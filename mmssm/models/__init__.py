"""Models registered in the ``mmssm`` scope (imported by the registry's locations)."""
from . import backbones, layers, necks  # noqa: F401
from .backbones import *  # noqa: F401,F403
from .necks import *  # noqa: F401,F403
