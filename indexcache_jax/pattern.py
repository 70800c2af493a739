"""The IndexCache pattern: which layers run their own indexer (Full, "F") and which reuse the indices of the
nearest preceding Full layer (Shared, "S"). SPEC §2; IndexCache, arXiv 2603.12201.

A pattern is a Python value (hashable, printable as "FSSSFSSS") for configs, CLIs and search paths, and a runtime
array (`flags`, bool[N], True = Full) for jitted code: the layer scan branches on the flag with `lax.cond`, so
evaluating another pattern reuses the compiled function instead of recompiling (the greedy search needs this).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

FULL, SHARED = "F", "S"


@dataclasses.dataclass(frozen=True)
class IndexCachePattern:
    layout: str  # one letter per layer, "F" or "S"; layer 0 is always "F"

    def __post_init__(self):
        if not isinstance(self.layout, str) or not self.layout:
            raise ValueError(f"IndexCache pattern must be a non-empty string of 'F'/'S', got {self.layout!r}")
        bad = sorted({c for c in self.layout if c not in (FULL, SHARED)})
        if bad:
            raise ValueError(f"IndexCache pattern {self.layout!r} contains {bad}; only 'F' (Full) and 'S' (Shared) "
                             "are allowed")
        if self.layout[0] != FULL:
            raise ValueError(f"IndexCache pattern {self.layout!r}: layer 0 must be 'F' (a Shared layer reuses the "
                             "indices of an earlier Full layer, and layer 0 has none)")

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> IndexCachePattern:
        """Parse "FSSSFSSS" (case-insensitive, spaces ignored); check the length when num_layers is given."""
        if not isinstance(text, str):
            raise ValueError(f"IndexCache pattern must be a string, got {type(text).__name__} {text!r}")
        pattern = cls("".join(text.split()).upper())
        if num_layers is not None and len(pattern) != num_layers:
            raise ValueError(f"IndexCache pattern {pattern.layout!r} has {len(pattern)} letters but the model has "
                             f"{num_layers} layers; give one letter per layer")
        return pattern

    @classmethod
    def all_full(cls, num_layers: int) -> IndexCachePattern:
        """Plain DSA: every layer runs its indexer."""
        _check_num_layers(num_layers)
        return cls(FULL * num_layers)

    @classmethod
    def from_full_layers(cls, num_layers: int, full_layers: Iterable[int]) -> IndexCachePattern:
        """Full at the given layer ids, Shared elsewhere; layer 0 must be among them."""
        _check_num_layers(num_layers)
        ids = sorted(set(int(i) for i in full_layers))
        out_of_range = [i for i in ids if not 0 <= i < num_layers]
        if out_of_range:
            raise ValueError(f"full layer ids {out_of_range} are outside [0, {num_layers})")
        return cls("".join(FULL if i in ids else SHARED for i in range(num_layers)))

    @classmethod
    def uniform(cls, num_layers: int, retention: float) -> IndexCachePattern:
        """Uniform interleave keeping about `retention` of the indexers: round(retention * N) Full layers (at
        least 1) at evenly spaced ids starting from 0, e.g. N=8, retention=1/4 gives FSSSFSSS."""
        _check_num_layers(num_layers)
        if not 0 < retention <= 1:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        num_full = max(1, round(retention * num_layers))
        return cls.from_full_layers(num_layers, (i * num_layers // num_full for i in range(num_full)))

    # ---- views ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layout)

    def __str__(self) -> str:
        return self.layout

    @property
    def num_layers(self) -> int:
        return len(self.layout)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.layout) if c == FULL)

    @property
    def retention(self) -> float:
        """Fraction of layers that run their indexer."""
        return len(self.full_layers) / len(self.layout)

    @property
    def flags(self) -> np.ndarray:
        """bool[N], True where the layer is Full: the runtime form passed into jitted functions."""
        return np.array([c == FULL for c in self.layout], dtype=bool)

    def source_layer(self, layer: int) -> int:
        """The layer whose indexer produces the indices `layer` attends with (itself if Full)."""
        return max(i for i in self.full_layers if i <= layer)

    def with_shared(self, layer: int) -> IndexCachePattern:
        """This pattern with `layer` turned Shared (one greedy-search move)."""
        return IndexCachePattern(self.layout[:layer] + SHARED + self.layout[layer + 1:])


def _check_num_layers(num_layers: int) -> None:
    if not isinstance(num_layers, (int, np.integer)) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")


def as_flags(pattern: IndexCachePattern | str | np.ndarray | None, num_layers: int) -> np.ndarray:
    """Normalise any accepted pattern form to the runtime flags bool[N], checking it fits the model."""
    if pattern is None:
        return IndexCachePattern.all_full(num_layers).flags
    if isinstance(pattern, str):
        return IndexCachePattern.parse(pattern, num_layers).flags
    if isinstance(pattern, IndexCachePattern):
        if len(pattern) != num_layers:
            raise ValueError(f"IndexCache pattern {pattern.layout!r} has {len(pattern)} layers but the model has "
                             f"{num_layers}")
        return pattern.flags
    return pattern  # already an array (possibly traced); shape is checked by the caller
