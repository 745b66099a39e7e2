"""Cache a site's activations over a set of images into sharded safetensors files, and read them back.

    manifest = cache_activations(model, "blocks.2.hook_resid_post", images, "acts/", tokens="patches")
    store = ActivationStore("acts/")
    for batch in store.batches(4096):          # [<= 4096, d_in], shard after shard, in order
        ...

Either backend (a HookedViT or a traced model) produces it. `images`: normalised model inputs
[N, 3, H, W], or a torch Dataset of them (items may be (image, label) pairs). `tokens`: "all",
"cls", "patches" or "registers" (the prefix tokens after the CLS and distillation ones). Each
shard (`shard_00000.safetensors`) holds whole images: `acts` [rows, d_in] float32, and for
every row its `image` index and `token` position. `manifest.json` says which model, site and
token selection, the preprocessing (input size, mean, std), how many images, and every shard
with its image range, row count and sha256. Written shard by shard (each to a temporary name,
then renamed, then the manifest), so an interrupted cache resumes where it stopped: the same
call on the same folder skips the images already stored, and gives the same shards as an
uninterrupted run. Memory holds one shard. A folder whose manifest names another model, site,
token selection or image count is refused and left as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import replacing
from ..errors import InputError

MANIFEST = "manifest.json"
TOKENS = ("all", "cls", "patches", "registers")
FORMAT = "prisma-ext activation store 1"


def _token_positions(layout, tokens: str) -> list[int]:
    if tokens == "all":
        return list(range(layout.n_tokens))
    if tokens == "patches":
        return list(range(layout.n_prefix, layout.n_tokens))
    if tokens == "cls":
        if not layout.n_cls:
            raise InputError("cache_activations: tokens='cls', but this model has no CLS token")
        return [0]
    if not layout.n_reg:
        raise InputError("cache_activations: tokens='registers', but this model has no register tokens")
    return list(range(layout.n_cls + layout.n_dist, layout.n_prefix))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damaged_shard(folder: Path, shards: list[dict]) -> Path | None:
    """The first shard file the manifest lists that is missing or whose sha256 differs, or None."""
    for shard in shards:
        file = folder / shard["file"]
        if not file.is_file() or _sha256(file) != shard["sha256"]:
            return file
    return None


def _write_json(path: Path, data: dict) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _image(images: Any, i: int) -> Tensor:
    item = images[i]
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor) or item.ndim != 3:
        raise InputError(f"cache_activations: image {i} is {type(item).__name__} {getattr(item, 'shape', '')}; "
                         "expected a normalised image tensor [3, H, W]")
    return item


def _batch(images: Any, start: int, stop: int) -> Tensor:
    """Images start..stop as one batch [n, 3, H, W]: a slice of an image tensor (no copy), or the
    items of a dataset stacked."""
    if isinstance(images, Tensor) and images.ndim == 4:
        return images[start:stop]
    return torch.stack([_image(images, i) for i in range(start, stop)])


def cache_activations(model: Any, site: str, images: Any, folder: str | os.PathLike, tokens: str = "all",
                      images_per_shard: int = 256, batch_size: int = 32, progress: bool = False) -> dict:
    """Store `site`'s activations over `images` in `folder` (see the module docstring); returns
    the manifest. Resumes an interrupted cache of the same model, site, tokens and images."""
    from ..analysis.backend import Backend
    from ..analysis.progress import Progress

    if tokens not in TOKENS:
        raise InputError(f"cache_activations: tokens must be one of {TOKENS}, got {tokens!r}")
    for name, value in (("images_per_shard", images_per_shard), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"cache_activations: {name} must be a positive int, got {value!r}")
    backend = Backend.of(model)
    cfg = backend.cfg
    sites = backend.site_names
    if site not in sites:
        from ..errors import UnknownNameError, suggest

        raise UnknownNameError(f"cache_activations: {suggest(site, list(sites), 'site')}")
    positions = _token_positions(backend.layout, tokens)
    n_images = len(images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "model": str(getattr(cfg, "source", "") or type(model).__name__), "site": site,
              "tokens": tokens, "positions": positions, "n_images": n_images, "images_per_shard": images_per_shard,
              "preprocessing": {"img_size": list(cfg.img_size), "mean": list(cfg.mean), "std": list(cfg.std)},
              "backend": backend.kind}
    manifest = _resume(folder, header)
    done = sum(s["images"][1] - s["images"][0] for s in manifest["shards"])
    pos = torch.tensor(positions)
    every_token = positions == list(range(backend.layout.n_tokens))
    with Progress(n_images - done, progress, f"caching {site}", unit="image") as bar:
        for start in range(done, n_images, images_per_shard):
            stop = min(start + images_per_shard, n_images)
            rows, image_ids = [], []
            for b in range(start, stop, batch_size):
                x = _batch(images, b, min(b + batch_size, stop))
                with torch.no_grad():
                    acts = backend.run(x.to(device=cfg.device, dtype=cfg.dtype), read=[site]).acts[site]
                if acts.ndim != 3 or acts.shape[1] != backend.layout.n_tokens:
                    raise InputError(f"cache_activations: {site} is {tuple(acts.shape)}, not [batch, token, d] over "
                                     f"the {backend.layout.n_tokens} tokens")
                kept = acts if every_token else acts[:, pos]  # all tokens: no copy before the shard's cat
                rows.append(kept.float().cpu().reshape(-1, acts.shape[-1]))
                image_ids.append(torch.arange(b, b + len(x)).repeat_interleave(len(positions)))
                bar.update(len(x))
            manifest["shards"].append(_write_shard(folder, len(manifest["shards"]), torch.cat(rows),
                                                   torch.cat(image_ids), pos, (start, stop)))
            manifest["d_in"] = int(manifest["shards"][-1]["d_in"])
            _write_json(folder / MANIFEST, manifest)
    manifest["complete"] = True
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _write_shard(folder: Path, index: int, acts: Tensor, image_ids: Tensor, pos: Tensor,
                 images: tuple[int, int]) -> dict:
    from safetensors.torch import save_file

    path = folder / f"shard_{index:05d}.safetensors"
    tokens = pos.repeat(images[1] - images[0])
    with replacing(path) as tmp:
        save_file({"acts": acts.contiguous(), "image": image_ids.contiguous(), "token": tokens.contiguous()},
                  str(tmp))
    return {"file": path.name, "images": list(images), "rows": int(acts.shape[0]), "d_in": int(acts.shape[1]),
            "sha256": _sha256(path)}


def _resume(folder: Path, header: dict) -> dict:
    """The manifest to continue: a fresh one, or the stored one when it is the same cache."""
    path = folder / MANIFEST
    if not path.exists():
        stray = sorted(p.name for p in folder.glob("shard_*.safetensors"))
        if stray:
            raise InputError(f"cache_activations: {folder} holds shards ({stray[0]}, ...) but no {MANIFEST}; use an "
                             "empty folder")
        return {**header, "shards": [], "complete": False}
    stored = json.loads(path.read_text())
    for key in ("format", "model", "site", "tokens", "positions", "n_images", "images_per_shard", "preprocessing"):
        if stored.get(key) != header[key]:
            raise InputError(f"cache_activations: {folder} holds a cache with {key}={stored.get(key)!r}, not "
                             f"{header[key]!r}; use another folder (nothing was changed)")
    bad = _damaged_shard(folder, stored["shards"])  # what is kept must be intact
    if bad is not None:
        raise InputError(f"cache_activations: {bad} is missing or does not match its checksum in {MANIFEST}")
    for extra in folder.glob(".shard_*.tmp"):  # a shard interrupted while being written
        extra.unlink()
    return stored


class ActivationStore:
    """A cache written by `cache_activations`, read shard by shard in order (sequential reads)."""

    def __init__(self, folder: str | os.PathLike, verify: bool = True):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise InputError(f"ActivationStore: {path} does not exist")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"ActivationStore: {path} is not a {FORMAT!r} manifest")
        if not self.manifest.get("complete"):
            raise InputError(f"ActivationStore: {self.folder} is an interrupted cache; run cache_activations again "
                             "with the same arguments to finish it")
        bad = _damaged_shard(self.folder, self.manifest["shards"]) if verify else None
        if bad is not None:
            raise InputError(f"ActivationStore: {bad} is missing or corrupted (its sha256 differs from {MANIFEST})")

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def shards(self) -> Iterator[dict[str, Tensor]]:
        """Each shard's tensors (acts [rows, d_in], image [rows], token [rows]), in order."""
        from safetensors.torch import load_file

        for shard in self.manifest["shards"]:
            yield load_file(str(self.folder / shard["file"]))

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Activations [<= batch_size, d_in], every row once, shard after shard."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"ActivationStore.batches: batch_size must be a positive int, got {batch_size!r}")
        carry = None
        for shard in self.shards():
            acts = shard["acts"] if carry is None else torch.cat([carry, shard["acts"]])
            whole = len(acts) - len(acts) % batch_size
            yield from acts[:whole].split(batch_size)
            carry = acts[whole:]
        if carry is not None and len(carry):
            yield carry
