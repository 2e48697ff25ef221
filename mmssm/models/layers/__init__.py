"""Mixers and blocks shared by the backbones."""
from .blocks import PreNormSSMBlock  # noqa: F401
from .embed import PatchEmbed  # noqa: F401
from .local_v2m_mixer import BiAttn, LocalV2MMixer  # noqa: F401
from .mamba_mixer import BiMambaMixer, ssm_pass  # noqa: F401
from .ss2d import SS2D  # noqa: F401
from .v2m_mixer import SSM2D, V2MMixer2D, parse_corners  # noqa: F401
from .vss_block import VSSBlock  # noqa: F401
