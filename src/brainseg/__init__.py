"""brainseg: lesion segmentation in brain MRI with U-Net++ and Attention U-Net."""

__version__ = "0.1.0"
