"""What the backends of a CLIP's vision tower share on either nnsight path (a traced CLIP here,
`clip_backend`, or one on a server, `backend_remote`): the tower's site names by their unprefixed
names, and the output: the image embedding (site `hook_image_embed`) or, once a zero-shot head
is installed, the zero-shot logits embed @ classes.T."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .backend_base import CLIP_OUTPUT as OUTPUT


class TowerSites:
    """Mixin: the sites of one tower of a TracedCLIP (`tower`: "visual" or "text") by their
    unprefixed names (`blocks.3.hook_resid_post` is the model's `visual.blocks.3.hook_resid_post`)."""

    tower = "visual"

    @property
    def site_names(self) -> list[str]:
        n = len(self.model.towers[self.tower])
        return [name[n:] for name in self.model.site_names if self.model.tower_of(name) == self.tower]

    def model_site(self, name: str) -> str:
        return self.model.towers[self.tower] + name


class EmbeddingOutput:
    """Mixin: the output of a CLIP vision tower's backend, read at the embedding site. Needs
    `head` (a `ZeroShotHead` or None) and `return_type` ("logits" or "embeds")."""

    @property
    def embeds(self) -> bool:
        """Whether the output is the image embedding (no head, or return_type="embeds")."""
        return self.return_type == "embeds" or self.head is None

    @property
    def output_site(self) -> str | None:
        return OUTPUT if self.embeds else None

    def _mapped(self, names: list[str]) -> list[str]:
        return super()._mapped([*names, OUTPUT])  # the output is read at its site

    def from_embedding(self, embed: Tensor) -> Tensor:
        """The output for the image embedding [batch, d_proj] (after any edit of it)."""
        return embed if self.embeds else F.linear(embed, self.head.weight.to(embed))
