"""Deployment: ONNX export of mmssm models in standard operators, onnxruntime checks.

Importing this package needs only torch; onnx / onnxscript / onnxruntime (the ``deploy``
extra: ``pip install -e .[deploy]``) are imported when an export or a check runs.
"""
