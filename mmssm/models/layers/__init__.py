"""Mixers and blocks shared by the backbones."""
