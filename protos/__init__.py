"""Protocol buffers and generated gRPC stubs (regenerate with ``python protos/generate.py``)."""
