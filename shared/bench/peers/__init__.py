"""The servers users would pick instead of onnxfn, each run from its own venv by `onnxfn bench --peers`.

These modules import only what their own venv has (never `shared`): they are run as scripts.
"""
