"""cluda: CLUDA (contrastive learning for UDA semantic segmentation) on DAFormer / HRDA self-training."""
__version__ = "0.1.0"
