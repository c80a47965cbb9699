"""The programs an export writes beside the weights: a `torch.export` program (model.pt2) and
ONNX (model.onnx), each traced on an example batch with the batch and spatial sizes left free,
then run on another batch and size and checked against the eager network's logits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from nas.network.builder import UNet
    from nas.network.model_card import Inference


# An exported program must give the eager model's logits within this (float32 round-off).
RTOL, ATOL = 1e-3, 1e-4


FORMATS = ("pt2", "onnx")


def example_input(model: UNet, inference: Inference, in_channels: int) -> torch.Tensor:
    """A batch of two, each spatial size the patch rounded up to a multiple (at least 2x)."""
    import torch

    sizes = [
        max(2 * m, -(-p // m) * m)
        for p, m in zip(inference.patch_size, model.size_multiple, strict=True)
    ]
    return torch.randn(2, in_channels, *sizes, generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(model: UNet) -> dict:
    """Batch and every spatial size free; spatial sizes multiples of the total stride, >= 2x."""
    import torch

    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    for axis, m in enumerate(model.size_multiple):
        dims[axis + 2] = m * torch.export.Dim(f"k{axis}", min=2, max=8192 // m)
    return {"x": dims}


def _max_difference(
    model: UNet, example: torch.Tensor, exported: Callable[[torch.Tensor], np.ndarray], what: str
) -> float:
    """Run the exported program on another batch size and spatial size than it was traced
    with; its logits must match the eager model's within RTOL/ATOL."""
    import numpy as np
    import torch

    with torch.no_grad():
        check = torch.randn(1, *example.shape[1:-1], example.shape[-1] * 2)
        reference = model(check).numpy()
        actual = exported(check)
    if actual.shape != reference.shape or not np.allclose(actual, reference, RTOL, ATOL):
        raise RuntimeError(f"the {what} export differs from the eager model")
    return float(np.abs(actual - reference).max())


def export_pt2(model: UNet, example: torch.Tensor, path: Path) -> float:
    import torch

    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return _max_difference(model, example, lambda x: loaded(x).numpy(), "pt2")


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter prints its progress, and warns and logs about operators it skips."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_onnx(model: UNet, example: torch.Tensor, path: Path) -> float:
    import torch

    try:
        import onnxruntime
    except ImportError:
        raise NasError("--format", "onnx needs onnx, onnxscript and onnxruntime: "
                       'pip install "nas[onnx]"') from None  # fmt: skip
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model),
            input_names=["image"],
            output_names=["logits"],
            verbose=False,
        )
        program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _max_difference(
        model, example, lambda x: session.run(None, {"image": x.numpy()})[0], "onnx"
    )


def write_networks(staging: Path, networks: dict, example, formats: Sequence[str]) -> dict:
    """Each member's weights (and pt2/onnx programs) into its subfolder of `staging` ("" is
    the folder itself); returns each program's largest difference from eager."""
    import torch

    from nas.network.inference import ONNX_FILE, PT2_FILE
    from nas.network.model_card import WEIGHTS_FILE

    checks = {}
    for name, network in networks.items():
        folder = staging / name
        folder.mkdir(exist_ok=True)
        torch.save(network.state_dict(), folder / WEIGHTS_FILE)
        if "pt2" in formats:
            checks[f"{name}/{PT2_FILE}".lstrip("/")] = export_pt2(
                network, example, folder / PT2_FILE
            )
        if "onnx" in formats:
            checks[f"{name}/{ONNX_FILE}".lstrip("/")] = export_onnx(
                network, example, folder / ONNX_FILE
            )
    return checks
