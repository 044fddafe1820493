"""visionserve: export, compile and serve ResNet classifiers and UNet segmenters."""

__version__ = "0.1.0"
