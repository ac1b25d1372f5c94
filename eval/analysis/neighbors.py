"""Nearest training images of generated samples: ``python -m eval.analysis.neighbors --ckpt CKPT --data SPEC``.

For each query (a generated sample, or with ``--query-indices`` an image of the data set itself)
the ``k`` training images closest in L1 distance, in two spaces, as in the SN-GAN paper's
nearest-neighbour figure (Miyato et al. 2018, Appendix):

- ``phi``: D's penultimate features phi(x) (``D.features``: before the linear output and the
  projection term, so the search is the same for a D trained with or without labels);
- ``pixel``: raw pixels, scaled to [0, 1].

The search is exact and streams the data once: each rank takes a disjoint exact slice of the data
set (``trainer.dist.exact_slice``; shards are read in order, so a rank reads only its own shards),
computes the features of a batch, the ``[queries, batch]`` L1 distances, and keeps a running top-k
(distances, indices, labels and the images themselves, so no random access to the data is needed
afterwards). Rank 0 gathers the ranks' ``k`` candidates per query and merges them. The work per
image is one D forward plus ``queries`` distance rows, so ImageNet (1.28M images) is a few D
epochs' worth of forwards spread over the ranks; throughput is printed as images/s.

Writes ``OUT/neighbors_phi.png`` and ``OUT/neighbors_pixel.png`` (query column, a gap, then the
neighbours from nearest to farthest; one row per query) and ``OUT/neighbors.json``.
Runs under ``python``, ``torchrun`` and ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(os.path.dirname(_HERE))] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch
import torchvision

from trainer import dist
from eval.analysis.grids import int_list
from trainer.errors import UsageError, exit_code_of, report

SPACES = ("phi", "pixel")


@torch.no_grad()
def embed(images: torch.Tensor, space: str, D: Optional[torch.nn.Module], device) -> torch.Tensor:
    """float32 ``[B, F]`` vectors of uint8 images in ``space``."""
    if space == "pixel":
        return images.to(device).float().div_(255.0).flatten(1)
    if space == "phi":
        from data_pipelines.stream import to_model_range
        return D.features(to_model_range(images, device)).float().flatten(1)
    raise UsageError(f"unknown space {space!r}; valid: {', '.join(SPACES)}")


class TopK:
    """Running k smallest distances per query, with each candidate's index, label and image."""

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.dist = torch.zeros(num_queries, 0)
        self.extra: Dict[str, Optional[torch.Tensor]] = {"index": None, "label": None, "image": None}

    def update(self, dist_qb: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        """``dist_qb`` ``[Q, B]``; ``batch`` maps each extra name to a ``[B, ...]`` tensor."""
        q, old = self.dist.shape
        both = torch.cat([self.dist, dist_qb.float().cpu()], dim=1)
        keep = min(self.k, both.shape[1])
        self.dist, pos = both.topk(keep, dim=1, largest=False, sorted=True)
        from_old = pos < old
        rows = torch.arange(q).unsqueeze(1).expand_as(pos)
        for name, new in batch.items():
            new = new.cpu()
            out = new.new_empty((q, keep) + tuple(new.shape[1:]))
            if old:
                out[from_old] = self.extra[name][rows[from_old], pos[from_old]]
            out[~from_old] = new[(pos - old)[~from_old]]
            self.extra[name] = out

    def merge_ranks(self) -> None:
        """Keep the global top-k on rank 0 (other ranks' results are dropped)."""
        if dist.world_size() == 1:
            return
        dev = dist.device()
        counts = dist.all_gather_counts(self.dist.shape[1], dev)
        rows = {"dist": self.dist.t().contiguous(), **{n: t.transpose(0, 1).contiguous()
                                                       for n, t in self.extra.items()}}
        gathered = {n: dist.gather_rows(t.to(dev), counts) for n, t in rows.items()}
        if not dist.is_main():
            return
        # Here every query has its own candidates ([Q, ranks * k]), unlike a data batch's columns.
        both = gathered["dist"].cpu().t()
        self.dist, pos = both.topk(min(self.k, both.shape[1]), dim=1, largest=False, sorted=True)
        rows = torch.arange(both.shape[0]).unsqueeze(1).expand_as(pos)
        self.extra = {n: gathered[n].cpu().transpose(0, 1)[rows, pos] for n in self.extra}


def search(queries: torch.Tensor, source, D: Optional[torch.nn.Module], k: int = 5,
           spaces: Sequence[str] = SPACES, batch_size: int = 256, num_images: int = 0,
           device=None) -> dict:
    """Exact k-NN of uint8 ``queries`` over the first ``num_images`` (0: all) of ``source``.

    Collective. Returns on rank 0 ``{space: TopK}`` plus ``images`` and ``seconds``.
    """
    device = device or dist.device()
    n = len(source) if num_images <= 0 else min(num_images, len(source))
    if n < 1:
        raise UsageError("the data set is empty")
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if "phi" in spaces and D is None:
        raise UsageError("the phi space needs a discriminator")
    t0 = time.time()
    q_vec = {s: embed(queries, s, D, device) for s in spaces}
    tops = {s: TopK(queries.shape[0], k) for s in spaces}
    start, end = dist.exact_slice(n)
    for images, labels, index in source.batches(start, end, batch_size):
        if images.shape[1:] != queries.shape[1:]:
            raise UsageError(f"data images are {tuple(images.shape[1:])} but the queries are "
                             f"{tuple(queries.shape[1:])}; pass --resolution {queries.shape[-1]}")
        payload = {"index": index, "label": labels, "image": images}
        for s in spaces:
            d = torch.cdist(q_vec[s], embed(images, s, D, device), p=1)
            tops[s].update(d, payload)
    for top in tops.values():
        top.merge_ranks()
    dist.barrier()
    return {"spaces": tops, "images": n, "seconds": time.time() - t0}


def neighbor_grid(queries: torch.Tensor, neighbours: torch.Tensor, gap: int = 4, scale: int = 1) -> torch.Tensor:
    """``[3, H, W]`` float grid: query column, a white gap, then the neighbours of each query;
    ``scale``: nearest-neighbour enlargement of the images."""
    if scale > 1:
        up = lambda x: x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # noqa: E731
        queries, neighbours = up(queries), up(neighbours)
    q, k = neighbours.shape[:2]
    left = torchvision.utils.make_grid(queries.float() / 255, nrow=1, padding=1, pad_value=1.0)
    right = torchvision.utils.make_grid(neighbours.flatten(0, 1).float() / 255, nrow=k, padding=1,
                                        pad_value=1.0)
    space = torch.ones(3, left.shape[1], gap)
    return torch.cat([left, space, right], dim=2)


def _generated_queries(ckpt: str, n: int, classes: Optional[List[int]], seed: int, device):
    from eval.ckpt import resolve_generator
    from eval.analysis.discriminator import resolve_checkpoint
    from eval.generate import sample_noise, to_uint8
    from models.export import load_generator
    gen_path, _ = resolve_generator(ckpt if ckpt.endswith(".safetensors") else resolve_checkpoint(ckpt))
    G, meta = load_generator(gen_path, device=device)
    num_classes = int(getattr(G, "num_classes", 0) or 0)
    if num_classes:
        cls = classes or [i % num_classes for i in range(n)]
        bad = [c for c in cls if not 0 <= c < num_classes]
        if bad:
            raise UsageError(f"--classes {bad} outside [0, {num_classes})")
    else:
        cls = [0] * n
    cls = (cls * n)[:n]
    z = sample_noise(seed, cls, list(range(n)), G.z_dim, getattr(G, "z_dist", "normal")).to(device)
    y = torch.tensor(cls, device=device) if num_classes else None
    with torch.no_grad():
        images = to_uint8(G(z, y).float()).cpu()
    return images, (cls if num_classes else None)


def _data_queries(source, indices: List[int]) -> torch.Tensor:
    bad = [i for i in indices if not 0 <= i < len(source)]
    if bad:
        raise UsageError(f"--query-indices {bad} outside the data set [0, {len(source)})")
    return torch.cat([next(iter(source.batches(i, i + 1, 1)))[0] for i in indices])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder ckpt-<step>/ or run folder (newest checkpoint); "
                                                 "D for phi, G for the queries")
    p.add_argument("--data", required=True, help="training data: synthetic[:RES[:SIZE[:SEED]]], an image folder "
                                                 "or WebDataset shards (as eval.reference)")
    p.add_argument("--out", default="neighbors", help="output folder")
    p.add_argument("--k", type=int, default=5, help="neighbours per query")
    p.add_argument("--num-queries", type=int, default=8, help="generated queries")
    p.add_argument("--classes", default=None, help="comma-separated classes of the generated queries "
                                                   "(conditional G; default: 0, 1, 2, ...)")
    p.add_argument("--query-indices", default=None, help="use these data set images as queries instead "
                                                         "(each must find itself at distance 0)")
    p.add_argument("--spaces", default="phi,pixel", help=f"comma-separated subset of {','.join(SPACES)}")
    p.add_argument("--num-images", type=int, default=0, help="search the first N images (0: all)")
    p.add_argument("--resolution", type=int, default=None, help="resample data images to RxR first")
    p.add_argument("--batch-size", type=int, default=256, help="data images per rank per step")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generated queries")
    p.add_argument("--scale", type=int, default=1, help="enlarge the images of the PNGs this many times")
    args = p.parse_args(argv)
    from eval.data import open_source
    from eval.analysis.discriminator import load_discriminator
    try:
        spaces = [s.strip() for s in args.spaces.split(",") if s.strip()]
        bad = [s for s in spaces if s not in SPACES]
        if bad or not spaces:
            raise UsageError(f"--spaces {args.spaces!r}: unknown {bad}; valid: {','.join(SPACES)}")
        for flag in ("num_queries", "k", "batch_size", "scale"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        dist.init()
        device = dist.device()
        source = open_source(args.data, args.resolution)
        D, info = (load_discriminator(args.ckpt, device) if "phi" in spaces else (None, {}))
        indices = int_list(args.query_indices, "--query-indices")
        if indices:
            queries, q_classes = _data_queries(source, indices), None
        else:
            queries, q_classes = _generated_queries(args.ckpt, args.num_queries,
                                                    int_list(args.classes, "--classes"), args.seed, device)
        result = search(queries, source, D, args.k, spaces, args.batch_size, args.num_images, device)
    except Exception as exc:
        if exit_code_of(exc) is None:
            raise  # a bug: its traceback, exit 1
        return report(exc)  # declared bad input: one line, exit 2
    if dist.is_main():
        os.makedirs(args.out, exist_ok=True)
        rate = result["images"] / max(result["seconds"], 1e-9)
        record = {"ckpt": info.get("ckpt", args.ckpt), "data": args.data, "k": args.k,
                  "queries": indices or "generated", "query_classes": q_classes,
                  "images": result["images"], "seconds": round(result["seconds"], 2),
                  "images_per_s": round(rate, 1), "world_size": dist.world_size(), "spaces": {}}
        for s, top in result["spaces"].items():
            path = os.path.join(args.out, f"neighbors_{s}.png")
            torchvision.utils.save_image(neighbor_grid(queries, top.extra["image"], scale=args.scale), path)
            record["spaces"][s] = {"index": top.extra["index"].tolist(), "label": top.extra["label"].tolist(),
                                   "distance": top.dist.tolist(), "png": path}
        with open(os.path.join(args.out, "neighbors.json"), "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"searched {result['images']} images in {result['seconds']:.1f}s: {rate:.1f} images/s "
              f"({dist.world_size()} process(es), spaces {','.join(spaces)}); wrote {args.out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
