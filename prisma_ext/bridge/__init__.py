"""TransformerLens `TransformerBridge` adapters for Hugging Face CLIP.

`register()` adds them to TL's adapter factory; after that
`build_bridge_from_module(hf_model, "CLIPModel", hf_config=hf_model.config)` works (also
`"CLIPVisionModel"` and `"CLIPVisionModelWithProjection"`). Importing this package is cheap:
TransformerLens loads inside `register()`.
"""

from __future__ import annotations

ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")

__all__ = ["ARCHITECTURES", "register"]


def register(*, override: bool = False) -> tuple[str, ...]:
    """Register the CLIP adapters with TL's `ArchitectureAdapterFactory`; idempotent.

    An architecture that already has a different adapter (TL grew its own, or another package
    registered one) is left alone unless `override=True`. Returns the names now served by ours.
    """
    from transformer_lens.factories.architecture_adapter_factory import (
        ArchitectureAdapterFactory,
    )

    from .clip import ADAPTERS

    # Discover entry points first: run later, TL would find these names taken and warn that
    # our own entry points try to override an adapter it already has.
    ArchitectureAdapterFactory.discover_entry_points()
    table = getattr(ArchitectureAdapterFactory, "_adapters", {})
    ours = []
    for name, adapter in ADAPTERS.items():
        current = table.get(name)
        if current is None or current is adapter or override:
            ArchitectureAdapterFactory.register_adapter(name, adapter)
            ours.append(name)
    return tuple(ours)
