"""Deployment: ONNX export of mmssm models in standard operators, onnxruntime checks.

Importing this package needs only torch; onnx / onnxscript / onnxruntime (the ``deploy``
extra: ``pip install -e .[deploy]``) are imported when an export or a check runs.
"""
from .scan_op import has_scan_op, register_stand_in

__all__ = ['has_scan_op', 'register_stand_in']
