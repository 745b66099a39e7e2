"""Token layout of a ViT: prefix tokens (CLS, distillation, registers), then the patch grid."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of the residual stream comes from.

    Tokens are ordered ``[cls?, dist?, reg_0..reg_{n-1}, patches in row-major order]``.
    `grid` is (rows, cols) of patches for `img_size`; `patch_size` is (height, width) in pixels.
    """

    n_cls: int
    n_dist: int
    n_reg: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    img_size: tuple[int, int]

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_dist + self.n_reg

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def prefix_names(self) -> tuple[str, ...]:
        names = ["cls"] * self.n_cls + ["dist"] * self.n_dist
        return tuple(names + [f"reg{i}" for i in range(self.n_reg)])

    @property
    def cls_index(self) -> int | None:
        return 0 if self.n_cls else None

    @property
    def dist_index(self) -> int | None:
        return self.n_cls if self.n_dist else None

    @property
    def patch_slice(self) -> slice:
        return slice(self.n_prefix, self.n_tokens)

    def token_labels(self) -> list[str]:
        """One label per token: prefix names, then ``p{row}_{col}`` for patches."""
        rows, cols = self.grid
        return list(self.prefix_names) + [f"p{r}_{c}" for r in range(rows) for c in range(cols)]

    def for_image(self, height: int, width: int) -> TokenLayout:
        """The same layout for another image size (grid recomputed)."""
        grid = (height // self.patch_size[0], width // self.patch_size[1])
        return TokenLayout(self.n_cls, self.n_dist, self.n_reg, grid, self.patch_size, (height, width))

    def describe(self) -> str:
        prefix = ", ".join(self.prefix_names) or "none"
        return (
            f"{self.n_tokens} tokens = {self.n_prefix} prefix ({prefix}) + "
            f"{self.grid[0]}x{self.grid[1]} patches of {self.patch_size[0]}x{self.patch_size[1]} px "
            f"(image {self.img_size[0]}x{self.img_size[1]})"
        )
