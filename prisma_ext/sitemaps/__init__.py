"""Site maps: where each TransformerLens site lives inside a source module, for the nnsight backend.

`spec` holds the vocabulary (`Site`, `View` and its subclasses, `SetAttr`), `builder` the one way
maps are written (`SiteMap`, `BlockSites`), `attention` the per-trace swaps that expose attention
values no module sees (open_clip's `nn.MultiheadAttention`, Hugging Face's attention functions),
and `timm`, `open_clip`, `hf` the maps of each source library. Adapters return these maps from
`Adapter.site_map`; `prisma_ext.traced` reads and writes through them. Nothing here imports
nnsight or the TL backend.
"""

from .attention import ExplicitMHA, SwapForward, serve
from .builder import BlockSites, SiteMap
from .spec import (
                   IDENTITY,
                   NOT_MAPPED,
                   Chunk,
                   ConvTokens,
                   FlattenGrid,
                   Half,
                   Heads,
                   SetAttr,
                   Site,
                   SwapAxes,
                   TupleItem,
                   Unsqueeze,
                   View,
)

__all__ = ["BlockSites", "Chunk", "ConvTokens", "ExplicitMHA", "FlattenGrid", "Half", "Heads", "IDENTITY", "NOT_MAPPED",
           "SetAttr", "Site", "SiteMap", "SwapAxes", "SwapForward", "TupleItem", "Unsqueeze", "View", "serve"]
