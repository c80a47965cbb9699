"""nas: neural architecture search for 2D/3D U-Net segmentation of NIfTI images.

The public names are imported on first use, so that `nas --help` and every command's
`--help` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nas.core.errors import NasError
    from nas.deploy.exported import load
    from nas.network.builder import UNet, build_unet, count_parameters
    from nas.network.unet_config import UNetConfig

__all__ = ["NasError", "UNet", "UNetConfig", "build_unet", "count_parameters", "load"]

# Each public name -> the module that defines it.
_SOURCES = {
    "NasError": "nas.core.errors",
    "UNet": "nas.network.builder",
    "UNetConfig": "nas.network.unet_config",
    "build_unet": "nas.network.builder",
    "count_parameters": "nas.network.builder",
    "load": "nas.deploy.exported",
}


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'nas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
