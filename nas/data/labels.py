"""What the network outputs and how its output becomes label values: plain classes or regions.

A dataset's cached label maps hold class indices (0 = background, 1..K). With plain classes
the network has one output per class (a softmax, or one sigmoid when K is 1) and each class
is scored. With regions (nnU-Net's region-based training: dataset.json labels listing several
values) it has one sigmoid per region, a region being a set of classes, and each region is
trained and scored on its own; predicted regions become a class map by writing each region's
label value (regions_class_order) where it is predicted, in order, later regions overwriting
earlier ones. Training, validation, export and predict all ask a `LabelScheme` rather than
branching on regions themselves. Knows nothing of files, networks or losses; it works on the
tensors it is given through their own methods, so reading a dataset does not load torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Region:
    name: str
    classes: tuple[int, ...]  # the class indices (1..K) it covers
    value: int  # the label value written where it is predicted (its regions_class_order entry)


@dataclass(frozen=True)
class LabelScheme:
    class_names: tuple[str, ...]  # foreground classes, class index 1..K
    class_values: tuple[int, ...]  # the label value each class index is written as; [0] = 0
    regions: tuple[Region, ...] = ()  # none: each class is an output of its own

    def __post_init__(self) -> None:
        if len(self.class_values) != len(self.class_names) + 1 or self.class_values[0] != 0:
            raise ValueError("class_values must give background (0) and one value per class")
        for region in self.regions:
            if region.value not in self.class_values[1:]:
                raise ValueError(f"region {region.name!r} writes {region.value}, not a class value")

    @classmethod
    def build(
        cls,
        class_of_value: Mapping[int, int],
        class_names: Sequence[str],
        regions: Mapping[str, Sequence[int]] | None = None,
        regions_class_order: Sequence[int] | None = None,
    ) -> LabelScheme:
        """From the label value -> class index mapping, the foreground class names and, for a
        region-based dataset, nnU-Net's `regions` (name -> label values) and
        `regions_class_order` (the value written for each region). A class merged from several
        values is written as the smallest. ValueError where these disagree."""
        values = []
        for k in range(1, len(class_names) + 1):
            members = [v for v, c in class_of_value.items() if c == k]
            if not members:
                raise ValueError(f"class {class_names[k - 1]!r} has no label value")
            values.append(min(members))
        built = []
        if regions:
            order = list(regions_class_order or ())
            if len(order) != len(regions):
                raise ValueError(
                    f"regions_class_order has {len(order)} values for {len(regions)} regions"
                )
            for (name, members), value in zip(regions.items(), order, strict=True):
                unknown = sorted(set(members) - set(class_of_value))
                if unknown:
                    raise ValueError(f"region {name!r} lists undeclared label values {unknown}")
                if value not in members:
                    raise ValueError(f"region {name!r} writes {value}, not one of its values")
                covered = tuple(sorted({class_of_value[v] for v in members}))
                built.append(Region(str(name), covered, int(value)))
        return cls(tuple(class_names), (0, *values), tuple(built))

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> LabelScheme:
        """The scheme `describe()` wrote (a model card's or a study's record of its data)."""
        labels = description["labels"]
        return cls.build(
            {int(value): k for k, value in enumerate(labels.values())},
            tuple(labels)[1:],
            description.get("regions"),
            description.get("regions_class_order"),
        )

    def describe(self) -> dict[str, Any]:
        """As an nnU-Net dataset.json says it (JSON): `labels` (name -> value, background
        first) and, with regions only, `regions` (name -> values) and `regions_class_order`."""
        labels = {"background": 0} | dict(zip(self.class_names, self.class_values[1:], strict=True))
        if not self.regions:
            return {"labels": labels}
        return {
            "labels": labels,
            "regions": {r.name: [self.class_values[c] for c in r.classes] for r in self.regions},
            "regions_class_order": [r.value for r in self.regions],
        }

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def output(self) -> Literal["sigmoid", "softmax", "regions"]:
        """regions: one sigmoid per region; sigmoid: one for the only class; else a softmax."""
        if self.regions:
            return "regions"
        return "sigmoid" if self.n_classes == 1 else "softmax"

    @property
    def out_channels(self) -> int:
        return {"regions": len(self.regions), "sigmoid": 1, "softmax": self.n_classes + 1}[
            self.output
        ]

    @property
    def scored_names(self) -> tuple[str, ...]:
        """What is trained and scored, one entry per score: the regions, or the classes."""
        return tuple(r.name for r in self.regions) or self.class_names

    @property
    def scored_kind(self) -> str:
        return "region" if self.regions else "class"

    @property
    def covers(self) -> tuple[tuple[int, ...], ...]:
        """The class indices each scored entry covers: its region's, or the class alone."""
        return tuple(r.classes for r in self.regions) or tuple(
            (k,) for k in range(1, self.n_classes + 1)
        )

    def encode(self, classes: torch.Tensor) -> torch.Tensor:
        """Class indices (B, *spatial) -> one binary target per scored entry (B, N, *spatial)
        float: a voxel belongs to every region holding its class."""
        table = classes.new_zeros((self.n_classes + 1, len(self.covers))).float()
        for n, members in enumerate(self.covers):
            table[list(members), n] = 1.0
        return table[classes].movedim(-1, 1)

    def present(self, classes: np.ndarray) -> np.ndarray:
        """(N,) bool: whether a class-index map holds any voxel of each scored entry."""
        classes = np.asarray(classes)
        found = {k for k in range(1, self.n_classes + 1) if np.any(classes == k)}
        return np.array([not found.isdisjoint(members) for members in self.covers])

    def classes_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices (uint8) from logits (out_channels, *spatial): per region sigmoid >
        0.5 writes its value, in order; else sigmoid > 0.5 for one class, argmax for more."""
        return self._classes(logits, threshold=0.0)  # sigmoid(x) > 0.5 <=> x > 0

    def classes_from_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """The same from probabilities (sigmoid or softmax), e.g. an ensemble's average."""
        return self._classes(probs, threshold=0.5)

    def _classes(self, outputs: torch.Tensor, threshold: float) -> torch.Tensor:
        if outputs.shape[0] != self.out_channels:
            raise ValueError(f"{outputs.shape[0]} outputs, expected {self.out_channels}")
        if self.output == "sigmoid":
            return (outputs[0] > threshold).byte()
        if self.output == "softmax":
            return outputs.argmax(0).byte()
        classes = outputs.new_zeros(outputs.shape[1:]).byte()
        for channel, region in zip(outputs, self.regions, strict=True):
            classes[channel > threshold] = self.class_values.index(region.value)
        return classes
