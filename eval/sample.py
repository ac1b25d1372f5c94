"""Samples from any checkpoint: ``python -m eval.sample RUN|CKPT|generator.safetensors --num N --out DIR``.

Writes ``N`` PNGs into ``DIR`` (``000123.png``; ``000123_c7.png`` for class 7 of a conditional
model), or with ``--out FILE.npz`` one uint8 NHWC array ``arr_0`` (the sample-batch format of
OpenAI's evaluator, torch-fidelity and clean-fid) plus ``labels`` for a conditional model.

Which samples: the evaluator's plan (:mod:`eval.generate`). They are class-major (class 0's, then
class 1's, ...), balanced over the classes (``--classes`` narrows them, ``--per-class K`` takes K
of each), and sample ``j`` of class ``c`` uses noise seeded by ``(--seed, c, j)``, so the files
are the samples ``eval/main.py`` scores with the same seed and counts. The file number is the
sample's index in the plan.

Launched with several processes (``torchrun`` / ``accelerate launch``), the ranks share the work
and each image is written once. The batches are cut from the whole plan (batch ``k`` holds samples
``[k * B, (k + 1) * B)``) and the ranks take disjoint, contiguous runs of whole batches, so every
sample is computed in the same batch whatever the number of ranks: the files are byte for byte
those of one process (a sample's pixels may otherwise move by one grey level with the batch it is
computed in). For ``.npz`` output rank 0 gathers the images in plan order and writes the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Iterator, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script path: the repository root on sys.path, not this folder (ARCHITECTURE.md)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np
import torch

from trainer import dist
from eval.generate import NonFiniteSamples, Plan, balanced_counts, generate
from trainer.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
OUR_NAME = re.compile(r"^\d{6,}(_c\d+)?\.png$")


# ----------------------------------------------------------------------------------------------
# what to sample


def parse_classes(text: Optional[str], num_classes: int) -> Optional[List[int]]:
    """``"1,2,5"`` -> ``[1, 2, 5]`` (sorted); ``None`` when unset. Names the bad value."""
    if text is None:
        return None
    try:
        classes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--classes {text!r}: expected comma-separated class indices, e.g. 1,2,5") from None
    if not classes:
        raise UsageError(f"--classes {text!r}: names no class; e.g. --classes 1,2,5")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes {text!r}: {bad} outside the generator's classes 0..{num_classes - 1}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise UsageError(f"--classes {text!r}: lists {twice} more than once; name each class once")
    return sorted(classes)


def make_plan(num: Optional[int], num_classes: int, classes: Optional[str], per_class: Optional[int],
              seed: int) -> Plan:
    """The plan of the samples to write (see the module docstring); refuses options that do not fit."""
    if num_classes == 0:
        for flag, value in (("--classes", classes), ("--per-class", per_class)):
            if value is not None:
                raise UsageError(f"{flag} {value}: the generator is unconditional (it has no classes); "
                                 f"drop {flag}")
        if num is None:
            raise UsageError("--num N is required: how many images to write")
        if num < 1:
            raise UsageError(f"--num {num}: must be at least 1")
        return Plan([num], False, seed)
    chosen = parse_classes(classes, num_classes) or list(range(num_classes))
    if per_class is not None:
        if per_class < 1:
            raise UsageError(f"--per-class {per_class}: must be at least 1")
        total = per_class * len(chosen)
        if num is not None and num != total:
            raise UsageError(f"--num {num} contradicts --per-class {per_class} x {len(chosen)} classes = {total}; "
                             f"drop --num")
        share = [per_class] * len(chosen)
    else:
        if num is None:
            raise UsageError("--num N is required (or --per-class K for K images of each class)")
        if num < 1:
            raise UsageError(f"--num {num}: must be at least 1")
        share = balanced_counts(num, len(chosen))
    counts = [0] * num_classes
    for c, k in zip(chosen, share):
        counts[c] = k
    return Plan(counts, True, seed)


def batch_runs(plan: Plan, batch_size: int, rank: Optional[int] = None, world: Optional[int] = None
               ) -> Tuple[int, int]:
    """This rank's samples ``[start, end)``: a contiguous run of whole batches of the plan."""
    num_batches = -(-plan.total // batch_size)
    b0, b1 = dist.exact_slice(num_batches, rank, world)
    return min(b0 * batch_size, plan.total), min(b1 * batch_size, plan.total)


def rank_batches(plan: Plan, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(global index, class, index within class)`` per batch of this rank (see :func:`batch_runs`)."""
    start, end = batch_runs(plan, batch_size)
    offsets = torch.tensor(plan.offsets, dtype=torch.int64)
    for b in range(start, end, batch_size):
        idx = torch.arange(b, min(b + batch_size, end), dtype=torch.int64)
        cls = torch.searchsorted(offsets, idx, right=True) - 1   # empty classes are passed over
        yield idx, cls, idx - offsets[cls]


def file_name(index: int, cls: int, plan: Plan) -> str:
    width = max(6, len(str(plan.total - 1)))
    return f"{index:0{width}d}_c{cls}.png" if plan.conditional else f"{index:0{width}d}.png"


def plan_names(plan: Plan) -> List[str]:
    names = []
    for c, n in enumerate(plan.counts):
        start = plan.offsets[c]
        names += [file_name(start + j, c, plan) for j in range(n)]
    return names


# ----------------------------------------------------------------------------------------------
# where to write


def folder_problem(out: str, plan: Plan, overwrite: bool) -> Optional[str]:
    """Why ``out`` must not receive these PNGs (or ``None``); with ``overwrite``, our stale files go.

    An FID tool reads every image of a folder, so images that this run does not write (a larger
    earlier run, other files) would silently enter the score.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is a file; name a folder for PNGs or a .npz file"
    if not os.path.isdir(out):
        return None
    expected = set(plan_names(plan))
    stale = sorted(n for n in os.listdir(out) if n.lower().endswith(IMAGE_SUFFIXES) and n not in expected)
    foreign = [n for n in stale if not OUR_NAME.match(n)]
    if foreign:
        return (f"--out {out!r} holds {len(foreign)} image file(s) not written by eval.sample (e.g. {foreign[0]!r}), "
                f"which an FID tool would read with the samples; use an empty or new folder")
    if stale and not overwrite:
        return (f"--out {out!r} holds {len(stale)} sample file(s) that this run does not write (e.g. {stale[0]!r}, "
                f"from another --num or --classes), which an FID tool would read too; pass --overwrite to delete "
                f"them or use an empty folder")
    for name in stale:
        os.remove(os.path.join(out, name))
    return None


def write_png(path: str, image_chw: torch.Tensor) -> None:
    """One uint8 image, written under a temporary name and renamed: a file is never half-written."""
    from PIL import Image
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def write_npz(path: str, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    with open(tmp, "wb") as fh:   # a file object: np.savez appends no second ".npz"
        np.savez(fh, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return dist.device()
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        if dist.device().type == "cuda":      # the launcher's device for this rank
            return dist.device()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def load(path: str, which: str, device: torch.device):
    """G (eval mode) and its meta; a checkpoint's generator must match the sha256 in its meta.json."""
    from eval.ckpt import CheckpointError, resolve_generator
    from models.export import GENERATOR_FILE, generator_file, load_generator
    gen = generator_file(path)
    if os.path.abspath(gen) != os.path.abspath(path):
        gen, _ = resolve_generator(os.path.dirname(gen))      # checkpoint or run folder: verify the file
    try:
        return load_generator(gen, which, device)
    except (TypeError, RuntimeError) as exc:   # unknown model kwargs, tensors of another shape
        raise CheckpointError(f"{gen}: not a loadable {GENERATOR_FILE} ({exc})") from exc


@torch.no_grad()
def _no_images(G, plan: Plan, device) -> torch.Tensor:
    """``[0, R, R, 3]`` uint8 for a rank without samples (more ranks than batches): the gather needs the shape."""
    y = torch.zeros(1, dtype=torch.int64, device=device) if plan.conditional else None
    res = int(G(torch.zeros(1, G.z_dim, device=device), y).shape[-1])
    return torch.zeros((0, res, res, 3), dtype=torch.uint8)


def sample(args) -> dict:
    """Write the samples (collective: every rank calls it). Returns a summary."""
    t0 = time.time()
    device = pick_device(args.device)
    which = "auto" if args.ema is None else ("G_ema" if args.ema else "G")
    G, meta = load(args.path, which, device)
    num_classes = int(getattr(G, "num_classes", 0) or 0)
    plan = make_plan(args.num, num_classes, args.classes, args.per_class, args.seed)
    to_npz = args.out.lower().endswith(".npz")
    if not to_npz:
        problem = folder_problem(args.out, plan, args.overwrite) if dist.is_main() else None
        problem = dist.broadcast_object(problem)
        if problem:
            raise UsageError(problem)
        if dist.is_main():
            os.makedirs(args.out, exist_ok=True)
        dist.barrier()
    start, end = batch_runs(plan, args.batch_size)
    images, labels, failure = [], [], None
    from tqdm import tqdm
    bar = tqdm(total=end - start, unit="img", disable=not dist.is_main() or args.no_progress, file=sys.stderr,
               desc=f"rank 0 of {dist.world_size()}" if dist.world_size() > 1 else "sampling")
    for idx, cls, within in rank_batches(plan, args.batch_size):
        try:
            x = generate(G, plan, idx, cls, within, device).cpu()
        except NonFiniteSamples as exc:   # every rank must learn of it before the next collective
            failure = str(exc)
            break
        if to_npz:
            images.append(x.permute(0, 2, 3, 1).contiguous())
            labels.append(cls)
        else:
            for i, c, img in zip(idx.tolist(), cls.tolist(), x):
                write_png(os.path.join(args.out, file_name(i, c, plan)), img)
        bar.update(len(idx))
    bar.close()
    flag = torch.tensor([1.0 if failure else 0.0], device=dist.device())
    if dist.all_reduce_sum_(flag).item() > 0:
        raise NonFiniteSamples(failure or "another rank's generator output holds NaN/inf pixels (see its message); "
                                          "the output is incomplete and must not be used")
    if to_npz:
        mine = torch.cat(images) if images else _no_images(G, plan, device)
        counts = [e - s for s, e in (batch_runs(plan, args.batch_size, r, dist.world_size())
                                     for r in range(dist.world_size()))]
        every = dist.gather_rows(mine.to(dist.device()), counts)
        every_label = dist.gather_rows((torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))
                                       .to(dist.device()), counts) if plan.conditional else None
        if dist.is_main():
            write_npz(args.out, every.cpu().numpy(),
                      None if every_label is None else every_label.cpu().numpy().astype(np.int64))
    dist.barrier()
    seconds = time.time() - t0
    return {"path": meta["path"], "generator": meta["name"], "which": meta["which"], "images": plan.total,
            "classes": [c for c, n in enumerate(plan.counts) if n] if plan.conditional else None,
            "out": args.out, "seconds": seconds, "world_size": dist.world_size()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="RUN|CKPT|GENERATOR",
                   help="run folder (its newest complete checkpoint; RUN/best works too), checkpoint folder "
                        "ckpt-<step>/ or generator.safetensors")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=None, metavar="N",
                   help="number of images (balanced over the classes of a conditional model); not needed with "
                        "--per-class. Under torchrun / accelerate launch write --num-samples: their parsers "
                        "take --num for their own --numa-binding / --num_processes")
    p.add_argument("--out", required=True, metavar="DIR|FILE.npz",
                   help="folder for PNGs, or FILE.npz for one uint8 NHWC array arr_0 "
                                                "(+ labels)")
    p.add_argument("--classes", default=None, metavar="C1,C2,...",
                   help="conditional models: comma-separated class indices to sample, e.g. 1,2,5 (None: all classes)")
    p.add_argument("--per-class", type=int, default=None, metavar="K",
                   help="conditional models: this many images of each class (of --classes, or of all)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; sample j of class c uses noise of (seed, c, j)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="G_ema (--ema) or G (--no-ema) weights (None: G_ema when the file holds it)")
    p.add_argument("--batch-size", type=int, default=100, metavar="B", help="images per generator call")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the launcher's device for this rank (CUDA when present)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete sample PNGs in --out that this run does not write (e.g. of a larger --num)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    dist.init()
    s = sample(args)
    if dist.is_main():
        rate = s["images"] / s["seconds"] if s["seconds"] > 0 else float("nan")
        classes = "" if s["classes"] is None else (f", classes {s['classes']}" if len(s["classes"]) <= 10
                                                    else f", {len(s['classes'])} classes")
        print(f"wrote {s['images']} images of {s['path']} ({s['generator']}, {s['which']}{classes}) to {s['out']} "
              f"in {s['seconds']:.1f}s ({rate:.0f} images/s, {s['world_size']} process(es))", flush=True)
    return 0


def main(argv=None) -> int:
    from eval.errors import cli
    return cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
