"""From an exported model folder to class probabilities: members, engines and mirroring.

An exported model is one network or an ensemble of several (the folds of a cross-validation,
each in its own subfolder). Each member runs on an engine: eager PyTorch, the `torch.export`
program (model.pt2) or ONNX Runtime (model.onnx), the last two when the export wrote them.
`Predictor` averages the members' probabilities (sigmoid or softmax of their logits) and,
with mirroring, those of every flip of the input along its spatial axes, flipped back, as
nnU-Net's test-time augmentation does. Sliding windows, preprocessing and file I/O belong to
nas.validation.validate and nas.predict; this module only turns one batch of windows into
probabilities.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nas.core.errors import NasError
from nas.network.unet_config import UNetConfig

Engine = Literal["auto", "eager", "pt2", "onnx"]
TTA = Literal["none", "mirror"]
ENGINES = ("auto", "eager", "pt2", "onnx")
PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
Runner = Callable[[torch.Tensor], torch.Tensor]  # (B, C, *spatial) -> logits (B, K, *spatial)


def probabilities(logits: torch.Tensor, output: str) -> torch.Tensor:
    """Probabilities (B, K, ...) from logits: a sigmoid per channel for one foreground logit
    or for regions, a softmax over the classes otherwise."""
    if output == "softmax":
        return torch.softmax(logits.float(), 1)
    return torch.sigmoid(logits.float())


def mirror_axes(n_spatial: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (B, C, *spatial) batch, the empty one first."""
    axes = range(2, 2 + n_spatial)
    return [flip for r in range(n_spatial + 1) for flip in itertools.combinations(axes, r)]


@dataclass(frozen=True)
class Predictor:
    """Averaged probabilities of `members` (each a logits runner) over `flips`."""

    members: tuple[Runner, ...]
    output: str  # "sigmoid" or "softmax", as the card's inference.output
    flips: tuple[tuple[int, ...], ...] = ((),)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for run in self.members:
            for flip in self.flips:
                logits = run(x.flip(flip) if flip else x)
                probs = probabilities(logits, self.output)
                probs = probs.flip(flip) if flip else probs
                total = probs if total is None else total + probs
        return total / (len(self.members) * len(self.flips))

    @property
    def passes(self) -> int:
        """Network evaluations per window."""
        return len(self.members) * len(self.flips)


def predictor(
    runners: Sequence[Runner], output: str, spatial_dims: int, tta: TTA = "none"
) -> Predictor:
    flips = mirror_axes(spatial_dims) if tta == "mirror" else [()]
    return Predictor(tuple(runners), output, tuple(flips))


def _padded_runner(run: Runner, cfg: UNetConfig) -> Runner:
    """An exported program takes spatial sizes that are multiples of the total stride and at
    least twice it; pad each window at the high end as the eager network does, crop back."""
    multiple = cfg.size_multiple

    def padded(x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        target = [max(2 * m, -(-s // m) * m) for s, m in zip(spatial, multiple, strict=True)]
        if list(spatial) != target:
            pad = [p for s, t in zip(spatial[::-1], target[::-1], strict=True) for p in (0, t - s)]
            x = F.pad(x, pad)
        return run(x)[(..., *(slice(0, s) for s in spatial))]

    return padded


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_providers(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for `device`: CUDA's, then the CPU's, on a CUDA
    device where this onnxruntime has it (the onnxruntime-gpu build); else the CPU's."""
    import onnxruntime

    if device.type == "cuda" and CUDA_PROVIDER in onnxruntime.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def onnx_fallback(device: torch.device) -> str | None:
    """The line to print when ONNX Runtime cannot run on `device` and runs on the CPU."""
    if device.type == "cpu" or CUDA_PROVIDER in onnx_providers(device):
        return None
    need = " (pip install onnxruntime-gpu)" if device.type == "cuda" else ""
    return f"onnxruntime has no {device.type} provider here{need}; running model.onnx on the CPU"


def choose_engine(requested: Engine, folder: Path, device: torch.device) -> str:
    """The engine a member folder runs on. `auto`: ONNX Runtime on a CPU when the folder has
    model.onnx and onnxruntime is installed, else eager (on a GPU, PyTorch itself). `onnx`
    on a CUDA device uses ONNX Runtime's CUDA provider where installed, else the CPU. The pt2
    program is used only when asked for: loading it unpickles data, which should be a
    deliberate choice."""
    if requested == "auto":
        onnx = (folder / ONNX_FILE).is_file() and onnx_available()
        return "onnx" if onnx and device.type == "cpu" else "eager"
    if requested == "onnx" and not onnx_available():
        raise NasError("--engine", 'onnx needs onnxruntime: pip install "nas[onnx]"')
    if requested in ("onnx", "pt2"):
        path = folder / (ONNX_FILE if requested == "onnx" else PT2_FILE)
        if not path.is_file():
            raise NasError(path, f"not found: export with --format {requested} for this engine")
    return requested


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_runner(
    folder: Path, cfg: UNetConfig, engine: str, device: torch.device, eager: nn.Module | None
) -> Runner:
    """A logits runner for one member folder. `eager`: the member's network with its weights
    loaded (in eval mode on `device`), needed for the eager engine."""
    if engine == "eager":
        if eager is None:
            raise ValueError("the eager engine needs the network")
        return eager
    if engine == "pt2":
        quiet = logging.getLogger("torch.export")  # it logs a damaged file before raising
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            module = torch.export.load(folder / PT2_FILE).module().to(device)
        except Exception as err:  # zip, pickle and graph errors of a damaged program
            raise NasError(folder / PT2_FILE, f"cannot be loaded as a torch.export program "
                           f"({_first_line(err)}); export it again") from None  # fmt: skip
        finally:
            quiet.setLevel(level)
        return _padded_runner(module, cfg)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(
            str(folder / ONNX_FILE), options, providers=onnx_providers(device)
        )
    except Exception as err:  # ONNX Runtime's own errors of a damaged or foreign file
        raise NasError(folder / ONNX_FILE, f"cannot be loaded by ONNX Runtime "
                       f"({_first_line(err)}); export it again") from None  # fmt: skip

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = session.run(None, {"image": x.cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    return _padded_runner(run, cfg)
