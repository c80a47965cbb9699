"""nas: neural architecture search for 2D/3D U-Net segmentation of NIfTI images."""

from nas.builder import UNet, UNetConfig, build_unet, count_parameters
from nas.errors import NasError
from nas.exported import load

__all__ = ["NasError", "UNet", "UNetConfig", "build_unet", "count_parameters", "load"]
