"""Estimate the memory a candidate needs from its configs alone, before anything is built.

A search space or an exported architecture.yaml can describe a network, or a patch, that needs
more memory than the machine has; building it or running one step would take the process (or
the machine) down instead of failing one trial. The estimate walks the same stages as the
builder's encoder and decoder: parameters are counted exactly, activations are the tensors
autograd keeps for backward (4 bytes each, as in float32 on CPU; CUDA's mixed precision halves
most of them, so there it errs on the safe side). Knows nothing of Optuna, YAML or data files.
It also reads what the host has: its RAM (or a container's limit), what is available now, and
the most a process has held (what preprocessing's workers are sized by and report), and holds
the one guard every allocation that input sizes passes before it is made (`check_allocation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nas.network.unet_config import UNetConfig, padded_size

if TYPE_CHECKING:
    pass

BYTES_PER_VALUE = 4  # float32 weights, gradients and activations
# Copies of the weights besides the weights themselves: the gradients, the optimizer's state,
# and one more for the temporaries of the foreach optimizer step (e.g. Adam's denominator).
# Multiplies the whole estimate: covers allocator rounding and fragmentation, the backends'
# scratch (oneDNN reorders, cuDNN workspaces), normalisation statistics and what the count
# below leaves out; measured peaks on CPU stay under the estimate (tests/network/test_memory.py).
SAFETY_FACTOR = 1.5


# PyTorch's CPU convolution has no direct kernel for one thin sample: a batch of 1 whose
# channels x first two axes hold at most this many values, with a kernel of at most 3 along the
# last two axes, is unfolded (im2col) into in_channels x kernel^dims values per output voxel
# (ATen's ConvParams::use_mkldnn). 3D sliding windows and batches of one meet it.
UNFOLDED_CONVOLUTION_MAX_VALUES = 20480


@dataclass(frozen=True)
class _Stage:
    """One resolution stage: its feature maps and its spatial size (one sample)."""

    channels: int
    size: tuple[int, ...]

    @property
    def voxels(self) -> int:
        return math.prod(self.size)


def parameter_count(unet: UNetConfig, in_channels: int) -> int:
    """The exact number of parameters `build_unet` gives `unet` when it reads `in_channels`
    input channels, as deployed (equal to nas.count_parameters of the built network: without
    deep supervision's heads); normalisation running statistics are buffers, not parameters,
    and are not counted."""
    features = unet.features_per_stage
    dims = unet.spatial_dims
    inputs = (in_channels, *features)
    total = sum(
        _block_parameters(unet, inputs[i], features[i], unet.kernel_sizes[i], unet.strides[i])
        for i in range(unet.depth)
    )
    for stage in range(unet.depth - 1):
        below, here = features[stage + 1], features[stage]
        if unet.upsampling == "transposed":
            total += below * here * math.prod(unet.strides[stage + 1]) + here
        else:
            total += below * here + here  # a 1x1 convolution after interpolation
        joined = here * (2 if unet.skips_per_stage[stage] and unet.skip_mode == "concat" else 1)
        total += _block_parameters(unet, joined, here, unet.kernel_sizes[stage], (1,) * dims)
    return total + features[0] * unet.out_channels + unet.out_channels  # the 1x1 head


def _aux_head_parameters(unet: UNetConfig) -> int:
    """Parameters of deep supervision's 1x1 heads, which training has besides the deployed
    network (none without deep supervision)."""
    if not unet.deep_supervision:
        return 0
    features = unet.features_per_stage[1 : unet.depth - 1]
    return sum(channels * unet.out_channels + unet.out_channels for channels in features)


def _block_parameters(
    unet: UNetConfig, in_channels: int, out_channels: int, kernel: int, stride: tuple[int, ...]
) -> int:
    """Parameters of one nas.network.builder.ConvBlock."""
    # Convolutions carry a bias only without normalisation; every norm has a scale and a shift.
    bias_or_norm = out_channels if unet.norm == "none" else 2 * out_channels
    total = 0
    for i in range(unet.convs_per_stage):
        fan_in = in_channels if i == 0 else out_channels
        total += fan_in * out_channels * kernel**unet.spatial_dims + bias_or_norm
    if unet.residual and (in_channels != out_channels or any(s != 1 for s in stride)):
        total += in_channels * out_channels + bias_or_norm
    return total


def _stages(unet: UNetConfig, patch_size: Sequence[int]) -> list[_Stage]:
    """Channels and spatial size of every stage, from the padded input the network sees."""
    size = padded_size(unet, patch_size)
    stages = []
    for channels, stride in zip(unet.features_per_stage, unet.strides, strict=True):
        size = tuple(-(-n // s) for n, s in zip(size, stride, strict=True))
        stages.append(_Stage(channels, size))
    return stages


def _unfolded_values(unet: UNetConfig, stages: list[_Stage], in_channels: int) -> int:
    """The largest im2col buffer a convolution allocates on CPU for a batch of one (0 if
    none does); it lives for one convolution at a time."""
    convs = []  # (input, output stage, kernel) of each distinct convolution shape
    inputs = (_Stage(in_channels, stages[0].size), *stages[:-1])
    for index, stage in enumerate(stages):
        kernel = unet.kernel_sizes[index]
        convs.append((inputs[index], stage, kernel))
        if unet.convs_per_stage > 1:  # the later convolutions of the encoder and decoder
            convs.append((stage, stage, kernel))
        if index < unet.depth - 1:  # the decoder's first, on the upsampled (and joined) input
            concat = unet.skips_per_stage[index] and unet.skip_mode == "concat"
            joined = _Stage(stage.channels * (2 if concat else 1), stage.size)
            convs.append((joined, stage, kernel))
    return max(
        (
            source.channels * kernel**unet.spatial_dims * target.voxels
            for source, target, kernel in convs
            if kernel <= 3
            and source.channels * math.prod(source.size[:2]) <= UNFOLDED_CONVOLUTION_MAX_VALUES
        ),
        default=0,
    )


def _kept_per_sample(unet: UNetConfig, patch_size: Sequence[int], in_channels: int) -> float:
    """Values per sample that autograd keeps for backward in one training step, plus what
    backward itself holds at its peak (gradients of the skips and of the widest layer)."""
    stages = _stages(unet, patch_size)
    # Per convolution: its output, the norm's output (the in-place activation's saved
    # result), GELU's separate output, dropout's mask (1 byte per value).
    per_conv = 1 + (unet.norm != "none") + (unet.activation == "gelu") + 0.25 * (unet.dropout > 0)
    # A residual block keeps its sum, and the projection's output where the shape changes.
    residual = 2 if unet.residual else 0

    def block(channels: int, voxels: int) -> float:
        return (unet.convs_per_stage * per_conv + residual) * channels * voxels

    full = stages[0].voxels
    kept = in_channels * full + 2 * full  # the batch: images, and int64 labels
    widest = in_channels * full
    for stage in stages:
        kept += block(stage.channels, stage.voxels)
        widest = max(widest, stage.channels * stage.voxels)
    skip_gradients = 0
    for index in reversed(range(unet.depth - 1)):
        here, below = stages[index], stages[index + 1]
        joined_channels = here.channels
        if unet.skips_per_stage[index]:
            skip_gradients += here.channels * here.voxels
            if unet.skip_mode == "concat":
                joined_channels *= 2
        if unet.upsampling == "interpolate":
            kept += below.channels * here.voxels  # the interpolated input of the 1x1 conv
        kept += joined_channels * here.voxels + block(here.channels, here.voxels)
        widest = max(widest, joined_channels * here.voxels)
    # The head's logits, and the loss's probabilities, one-hot target and log-probabilities;
    # with deep supervision the same at each lower stage with a head, and its labels resized
    # (int64, through a float copy).
    kept += 4 * unet.out_channels * full
    if unet.deep_supervision:
        kept += sum((4 * unet.out_channels + 3) * s.voxels for s in stages[1 : unet.depth - 1])
    widest = max(widest, unet.out_channels * full)
    # Backward holds the gradient of the output and of the input of the layer it is in, and a
    # backend's reordered copy; the skips' gradients wait until the encoder is reached.
    return kept + skip_gradients + 3 * widest


def estimate_step_bytes(
    unet: UNetConfig, batch: int, patch: Sequence[int], in_channels: int, weight_copies: int
) -> int:
    """Bytes one training step needs at its peak: the weights (deep supervision's heads
    included) with `weight_copies` more of them (gradients and the optimizer's state), and the
    activations of `batch` patches of `patch`, times SAFETY_FACTOR.

    in_channels: the input channels the data provides (the network's first convolution).
    """
    trained = parameter_count(unet, in_channels) + _aux_head_parameters(unet)
    weights = trained * (1 + weight_copies)
    activations = batch * _kept_per_sample(unet, patch, in_channels)
    if batch == 1:
        activations += _unfolded_values(unet, _stages(unet, patch), in_channels)
    return math.ceil(SAFETY_FACTOR * BYTES_PER_VALUE * (weights + activations))


def estimate_inference_bytes(unet: UNetConfig, patch_size: Sequence[int], in_channels: int) -> int:
    """Bytes to apply the network in eval mode to one window of `patch_size` (in-plane for a
    2D network, (X, Y, Z) for 3D): the weights, every stage's output (the encoder keeps them
    all for the decoder) and the working tensors of the widest layer, times SAFETY_FACTOR."""
    stages = _stages(unet, patch_size)
    full = stages[0].voxels
    skips = sum(stage.channels * stage.voxels for stage in stages)
    # A decoder stage holds its upsampled input, the joined tensor (twice the channels when
    # concatenated), a convolution's output and its norm's output.
    working = 5 * max(stage.channels * stage.voxels for stage in stages)
    if unet.residual:
        working *= 2
    activations = in_channels * full + skips + working + 2 * unet.out_channels * full
    activations += _unfolded_values(unet, stages, in_channels)
    weights = parameter_count(unet, in_channels)
    return math.ceil(SAFETY_FACTOR * BYTES_PER_VALUE * (weights + activations))
