"""The values every part of yolo-mpq shares: precisions and assignments, the objective table,
spec sections, data and calibration sets, model loading, run-directory files and cache keys.

The lower layer: it never imports ``quantizers``, ``evaluators`` or ``search``, and importing
it (or any of its modules) does not import torch.
"""
