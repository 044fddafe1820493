"""Export side of visionserve: model zoo, demo data and training, checkpoint loading, ONNX export,
validation and the model repository writer.

Kept import-light: importing this package does not import torch (``datasets`` never does).
"""
