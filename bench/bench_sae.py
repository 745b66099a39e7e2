"""What caching activations and training a TopK SAE cost, each side by side with a reference.

    .venv/bin/pip install -e '.[bench]'     # overcomplete and what it imports (part 2 only)
    .venv/bin/python bench/bench_sae.py [--part cache|train|both|auxk] [--threads 2] [--rounds 3]

1. Caching: `cache_activations(model, "blocks.{L//2}.hook_resid_post", images, folder,
   tokens="all")` against the same model's plain forward over the same images (same batch size,
   no_grad), for a random-weight timm ViT-S/16 and `builtin:shapes-vit`, on the TL backend (and
   the nnsight one with `--backend nnsight` or `both`, against its source module's forward). A
   fresh temporary folder per round; the two alternate round by round, medians compared.
   Target: cache / forward <= 1.15.
2. Training: `train_topk(x, d_sae, k, epochs, batch_size, lr)` against overcomplete 0.3.0's own
   loop (`overcomplete.sae.TopKSAE` + `overcomplete.sae.train_sae` with an MSE criterion and
   Adam, its defaults otherwise: gradient clipping at 1.0, monitoring=1) with the same d_in,
   d_sae, k, batch size, epochs and learning rate, on the same rows (a seeded sparse mixture:
   every row 16 of 4096 random unit directions plus noise). Both are fed the same way (whole
   shuffled batches indexed out of one tensor) and both times include one explained-variance
   pass over the data at the end (ours computes it inside `train_topk`), so the times are of the
   same work; the explained variances are printed. Alternating rounds, medians.
   Target: ours / overcomplete <= 1.1 (activations per second within 1.1x, or faster).
`--profile` adds where the time goes: cProfile of one cache call, torch.profiler of one
`train_topk` call (operators by self CPU time).

overcomplete is not a dependency of prisma-ext (it pulls scikit-learn, opencv, scikit-image,
matplotlib at import); the `bench` extra installs it for this script only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import shutil
import tempfile
from collections.abc import Callable

import torch
from timing import interleaved

import prisma_ext as px
from prisma_ext.sae.store import ActivationStore, cache_activations
from prisma_ext.sae.train import train_topk

CACHE_TARGET = 1.15
TRAIN_TARGET = 1.10
MODELS = ("timm:vit_small_patch16_224", "builtin:shapes-vit")


# ---------------------------------------------------------------------------------- 1. caching

def load(source: str, backend: str):
    pretrained = {} if source.startswith("builtin:") else {"pretrained": False}
    model = px.load(source, backend=backend, **pretrained)
    model.eval()  # (a traced model's eval() returns its source module)
    return model


def cache_case(source: str, backend: str, args) -> bool:
    model = load(source, backend)
    forward = model._module if backend == "nnsight" else model  # the traced model's plain forward is its source's
    layers = model.cfg.n_layers
    site = f"blocks.{layers // 2}.hook_resid_post"
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *model.cfg.img_size, generator=gen)

    def plain() -> None:
        with torch.no_grad():
            for b in range(0, len(images), args.batch):
                forward(images[b:b + args.batch])

    def cache() -> None:
        folder = tempfile.mkdtemp(prefix="bench_sae_")
        try:
            cache_activations(model, site, images, folder, tokens="all", batch_size=args.batch)
        finally:
            shutil.rmtree(folder)

    # the cache holds what a hooked run reads at the site, for every image and token
    with tempfile.TemporaryDirectory() as folder:
        cache_activations(model, site, images[:args.batch], folder, tokens="all", batch_size=args.batch)
        stored = next(ActivationStore(folder).shards())["acts"]
    with torch.no_grad():
        if backend == "nnsight":
            with model.trace(images[:args.batch]):
                value = model.site(site).save()
        else:
            value = model.run_with_cache(images[:args.batch], names_filter=[site])[1][site]
    err = float((stored - value.reshape(-1, value.shape[-1])).abs().max())
    plain()
    cache()
    med = interleaved({"forward": plain, "cache": cache}, args.rounds)
    ratio = med["cache"] / med["forward"]
    ok = ratio <= CACHE_TARGET
    rows = args.images * model.layout.n_tokens
    print(f"  {source} [{backend}], {site}, {args.images} images x {model.layout.n_tokens} tokens = {rows} rows "
          f"of {value.shape[-1]}, batch {args.batch}; stored = hooked run to {err:.1e}")
    print(f"    plain forward {med['forward']:7.2f} s   cache_activations {med['cache']:7.2f} s   "
          f"cache / forward {ratio:.3f} (target <= {CACHE_TARGET}: {'met' if ok else 'NOT met'})")
    if args.profile:
        profile_cache(model, site, images, args.batch)
    return ok


def profile_cache(model, site: str, images: torch.Tensor, batch: int) -> None:
    import cProfile
    import pstats

    folder = tempfile.mkdtemp(prefix="bench_sae_")
    try:
        prof = cProfile.Profile()
        prof.runcall(cache_activations, model, site, images, folder, tokens="all", batch_size=batch)
    finally:
        shutil.rmtree(folder)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    print("    cProfile of one cache call, by own time:")
    print("\n".join("      " + line for line in out.getvalue().splitlines() if line.strip()[:1].isdigit()))


def bench_cache(args) -> bool:
    backends = ("tl", "nnsight") if args.backend == "both" else (args.backend,)
    print(f"1. caching activations, tokens='all', {args.rounds} rounds interleaved (medians)")
    results = [cache_case(source, backend, args) for source in args.models for backend in backends]
    return all(results)


# --------------------------------------------------------------------------------- 2. training

def import_overcomplete():
    try:
        import matplotlib
        import matplotlib.cm

        matplotlib.use("Agg")
        if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0 calls it at import; matplotlib >= 3.9 lacks it
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        from overcomplete.sae import TopKSAE, train_sae
    except ImportError as e:
        raise SystemExit(f"bench_sae.py --part train needs overcomplete and what it imports ({e}); install them with "
                         "`.venv/bin/pip install -e '.[bench]'` (or run --part cache)") from e
    return TopKSAE, train_sae


def sparse_mixture(rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Rows made of 16 of 4096 random unit directions (uniform [0, 3) coefficients) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4096, d_in, generator=gen)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    x = torch.empty(rows, d_in)
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        idx = torch.rand(n, 4096, generator=gen).topk(16, dim=-1).indices
        codes = torch.zeros(n, 4096).scatter(-1, idx, 3 * torch.rand(n, 16, generator=gen))
        x[start:start + n] = codes @ atoms + 0.05 * torch.randn(n, d_in, generator=gen)
    return x


class Batches:
    """Whole shuffled batches indexed out of one tensor, a fresh order each epoch (as train_topk
    draws them)."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int):
        self.x, self.batch_size, self.gen = x, batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen)
        for start in range(0, len(self.x) - self.batch_size + 1, self.batch_size):
            yield self.x[order[start:start + self.batch_size]]


def explained_variance(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """1 - residual / variance over x (train_topk's definition), in chunks of 8192 rows."""
    with torch.no_grad():
        residual = sum(float((c - reconstruct(c)).pow(2).sum()) for c in x.split(8192))
        return 1 - residual / float((x - x.mean(0)).pow(2).sum())


def bench_train(args) -> bool:
    TopKSAE, train_sae = import_overcomplete()
    import overcomplete

    d_sae = args.expansion * args.d_in
    x = sparse_mixture(args.rows, args.d_in)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    # AuxK's window; train_topk's default is one epoch's rows
    ours_only = {"dead_after": args.dead_after} if args.dead_after else {}
    steps = args.epochs * (args.rows // args.batch_size)
    seen = steps * args.batch_size
    results: dict[str, float] = {}
    dead: dict[str, float] = {}

    def ours() -> None:
        _, log = train_topk(x, d_sae, args.k, seed=0, **settings, **ours_only)
        results["ours"], dead["ours"] = log["explained_variance"], log["dead_fraction"]

    def theirs() -> None:
        torch.manual_seed(0)  # overcomplete draws its initialisation from the global generator
        sae = TopKSAE(args.d_in, d_sae, top_k=args.k)
        optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)

        def mse(x, x_hat, pre_codes, codes, dictionary):
            return (x - x_hat).square().mean()

        with contextlib.redirect_stdout(io.StringIO()):  # its one line per epoch
            logs = train_sae(sae, Batches(x, args.batch_size, 0), mse, optimizer, nb_epochs=args.epochs)
        dead["overcomplete"] = logs["dead_features"][-1]  # over its last epoch
        sae.eval()
        results["overcomplete"] = explained_variance(lambda c: sae(c)[2], x)

    print(f"2. training a TopK SAE: d_in {args.d_in}, d_sae {d_sae}, k {args.k}, {args.rows} rows, batch "
          f"{args.batch_size}, {args.epochs} epochs ({steps} steps), lr {args.lr}, Adam; overcomplete "
          f"{getattr(overcomplete, '__version__', '?')}; {args.rounds} rounds interleaved (medians)")
    med = interleaved({"ours": ours, "overcomplete": theirs}, args.rounds)
    ratio = med["ours"] / med["overcomplete"]
    ok = ratio <= TRAIN_TARGET
    for name in ("ours", "overcomplete"):
        label = "prisma-ext train_topk" if name == "ours" else "overcomplete train_sae"
        print(f"    {label:24s} {med[name]:7.2f} s  {seen / med[name]:9.0f} activations/s  "
              f"explained variance {results[name]:.3f}  dead latents {dead[name]:.1%}")
    print(f"    ours / overcomplete (time) {ratio:.3f} (target <= {TRAIN_TARGET}: {'met' if ok else 'NOT met'})")
    if args.profile:
        profile_train(x, d_sae, args.k, {**settings, **ours_only})
    return ok


def profile_train(x: torch.Tensor, d_sae: int, k: int, settings: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_topk(x, d_sae, k, seed=0, **settings)
    print("    torch.profiler of one train_topk call, operators by self CPU time:")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print("\n".join("      " + line for line in table.splitlines()))


# ---------------------------------------------------------------------------------- 3. AuxK


def dense_aux_loss(sae, pre, error, dead, aux_k):
    """AuxK over every latent with the live ones masked out (the definition; what we had before)."""
    masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
    top = masked.topk(min(aux_k, int(dead.sum())), dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return ((acts @ sae.W_dec - error).pow(2).sum(-1).mean() / error.pow(2).sum(-1).mean())


def bench_auxk(args) -> bool:
    """AuxK forward + backward on the dead columns only against the dense definition, side by side."""
    from prisma_ext.sae.dictionary import SparseAutoencoder
    from prisma_ext.sae.objectives import aux_loss

    d_sae, aux_k = args.d_in * args.expansion, args.d_in // 2
    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(args.d_in, d_sae, "topk", args.k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, args.d_in, generator=gen))
    pre = torch.randn(args.batch_size, d_sae, generator=gen, requires_grad=True)
    error = torch.randn(args.batch_size, args.d_in, generator=gen)
    ok = True
    for share in (0.1, 0.5):
        dead = torch.rand(d_sae, generator=gen) < share
        calls = {name: (lambda f=f, dead=dead: f(sae, pre, error, dead, aux_k).backward())
                 for name, f in (("dead columns", aux_loss), ("dense", dense_aux_loss))}
        times = interleaved(calls, max(args.rounds, 5))
        ratio = times["dead columns"] / times["dense"]
        ok &= ratio <= 1.0
        print(f"AuxK, {share:.0%} of {d_sae} latents dead, batch {args.batch_size}: dead columns "
              f"{times['dead columns'] * 1e3:.1f} ms, dense {times['dense'] * 1e3:.1f} ms ({ratio:.2f}x)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("cache", "train", "both", "auxk"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    cache = parser.add_argument_group("caching")
    cache.add_argument("--models", nargs="+", default=list(MODELS))
    cache.add_argument("--backend", choices=("tl", "nnsight", "both"), default="tl")
    cache.add_argument("--images", type=int, default=64)
    cache.add_argument("--batch", type=int, default=32)
    train = parser.add_argument_group("training")
    train.add_argument("--rows", type=int, default=32768)
    train.add_argument("--d-in", type=int, default=384)
    train.add_argument("--expansion", type=int, default=4)
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--dead-after", type=int, default=None,
                       help="train_topk's dead_after (rows without firing before AuxK takes a latent up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {platform.processor() or platform.machine()}, float32; torch {torch.__version__}")
    ok = True
    if args.part in ("train", "both"):
        import_overcomplete()  # fail before the caching part, not after it
    if args.part in ("cache", "both"):
        ok &= bench_cache(args)
    if args.part in ("train", "both"):
        ok &= bench_train(args)
    if args.part == "auxk":
        ok &= bench_auxk(args)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
