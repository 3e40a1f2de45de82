"""What is differentiated for each image: a class score or an intermediate activation.

A target is written as a short string, the same in the CLI and the Python API:

==================== ===================================================
``predicted``        the predicted class (default)
``label``            the label given per image
``class:K``          the fixed class index K
``top:K``            the K highest-scoring classes (K maps per image)
``layer:NAME``       the sum of a layer's activation (e.g. ``conv5_block3_out``)
``layer:NAME:C``     the sum of channel C of that activation
==================== ===================================================

Example:
    >>> Target.parse("top:3").maps_per_image
    3
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("predicted", "label", "class", "top", "layer")


@dataclass(frozen=True)
class Target:
    kind: str = "predicted"
    index: int | None = None  # class index, k of top-k, or channel
    layer: str | None = None

    @classmethod
    def parse(cls, spec: "str | Target") -> "Target":
        if isinstance(spec, Target):
            return spec
        parts = str(spec).split(":")
        kind = parts[0]
        try:
            if kind in ("predicted", "label") and len(parts) == 1:
                return cls(kind)
            if kind in ("class", "top") and len(parts) == 2:
                value = int(parts[1])
                if value < (0 if kind == "class" else 1):
                    raise ValueError
                return cls(kind, value)
            if kind == "layer" and len(parts) in (2, 3) and parts[1]:
                channel = int(parts[2]) if len(parts) == 3 else None
                return cls(kind, channel, parts[1])
        except ValueError:
            pass
        raise ValueError(
            f"bad target {spec!r}; use predicted, label, class:K, top:K (K>=1), "
            "layer:NAME or layer:NAME:CHANNEL"
        )

    @property
    def maps_per_image(self) -> int:
        return self.index if self.kind == "top" else 1

    def __str__(self) -> str:
        if self.kind in ("predicted", "label"):
            return self.kind
        if self.kind == "layer":
            return f"layer:{self.layer}" + ("" if self.index is None else f":{self.index}")
        return f"{self.kind}:{self.index}"
