"""Which layers become MoE: a small spec language shared by the library and the CLI."""

from __future__ import annotations

__all__ = ["select_layers"]

LAYER_SPEC_HELP = (
    "'all', 'none', 'every_other' (layers 1, 3, 5, ... as in Switch/GShard), 'top:N' (the last N), "
    "'bottom:N' (the first N), or explicit indices like '0,2,5' / a list of ints"
)


def select_layers(spec: str | list[int] | tuple[int, ...] | None, num_layers: int, name: str = "layers") -> list[int]:
    """Sorted layer indices that `spec` selects out of `num_layers` (None means 'all')."""
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
    else:
        text = spec.strip().lower()
        if text == "all":
            return list(range(num_layers))
        if text == "none":
            return []
        if text == "every_other":
            return list(range(1, num_layers, 2))
        if text.startswith(("top:", "bottom:")):
            side, _, count_text = text.partition(":")
            if not count_text.isdigit() or not 0 <= int(count_text) <= num_layers:
                raise ValueError(f"{name}={spec!r}: N must be an integer in [0, {num_layers}]")
            count = int(count_text)
            return list(range(num_layers - count, num_layers)) if side == "top" else list(range(count))
        try:
            indices = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{name}={spec!r} is not a layer spec; use {LAYER_SPEC_HELP}") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"{name}={spec!r}: indices must be unique and in [0, {num_layers}); got {indices}")
    return sorted(indices)
