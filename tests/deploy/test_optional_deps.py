"""Importing mmssm (and mmssm.deploy) never needs the optional deploy packages."""
import subprocess
import sys


def test_import_does_not_load_onnx():
    code = ('import sys, mmssm, mmssm.models, mmssm.ops, mmssm.deploy; '
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') "
            'if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == '[]'
