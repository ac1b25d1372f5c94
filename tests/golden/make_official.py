"""Golden trajectories recorded from the OFFICIAL Chainer code (tests/golden/fixtures/official_*.npz).

Runs the reference implementations themselves (imported from the clones given on the command line,
never copied here) for K iterations at a small width, in float64, through their own updaters
(``Updater.update_core``), their own models and Chainer's own Adam / ``LinearShift``, and records
what they consumed and computed in the golden-fixture format (docs of the format: the
``meta``, ``G/<our key>``, ``final/...``, ``in/...`` and ``loss/...`` arrays):

- ``official_sngan_hinge_resnet``: pfnet-research/sngan_projection ``configs/sn_cifar10_unconditional.yml``
  (ResNetGenerator of ``gen_models/resnet_32.py``, SNResNetProjectionDiscriminator of
  ``dis_models/snresnet_32.py``, hinge loss, Adam (0, 0.9), linear decay of alpha by ``LinearShift``)
  -> our experiment ``cifar10_sngan_hinge_resnet``;
- ``official_projection``: the same repository's ``configs/sn_cifar10_conditional.yml`` (categorical
  conditional BN in G, projection D) -> ``cifar10_projection``;
- ``official_sngan_cnn``: pfnet-research/chainer-gan-lib ``--algorithm stdgan --architecture sndcgan
  --n_dis 1 --adam_beta1 0.5 --adam_beta2 0.999`` (``example.sh``; ``common/net.py`` DCGANGenerator and
  SNDCGANDiscriminator, ``stdgan/updater.py``) -> ``cifar10_sngan_cnn``.

Run it with the Chainer environment (Chainer 7.8.1, numpy, pyyaml; no torch needed)::

    /tmp/chainer-venv/bin/python tests/golden/make_official.py \\
        --sngan-projection /tmp/ref/sngan_projection --chainer-gan-lib /tmp/ref/chainer-gan-lib \\
        --out tests/golden/fixtures

What is done to the reference at run time (nothing in the clones is edited):

- float64: ``chainer.global_config.dtype = float64`` before any link is built (initializers follow it);
  then every float parameter and persistent (SN ``u``, BN statistics, the conditional BN's float32
  gains) is cast to float64. The updaters' ``Variable(...)`` is wrapped to cast their float32 batches
  (``astype("f")`` in ``get_batch`` / ``update_core``) to float64, and the latent samplers to return
  float64: the recorded inputs are exactly what the models received.
- ``source/functions/max_sv.py`` of sngan_projection normalizes with a cupy-only elementwise kernel;
  its ``_l2normalize`` is replaced by the numpy expression of the same formula, x / (||x|| + eps).
- chainer-gan-lib's SN links draw u lazily at their first forward; here every SN link gets its u drawn
  (N(0, 1), the same distribution) before the first forward, so that the initial u can be recorded.
- Real images: random uint8 images in a small in-memory dataset whose ``get_example`` applies the
  official transform (sngan_projection ``datasets/cifar10.py``: x / 128 - 1 + U[0, 1/128);
  chainer-gan-lib ``common/dataset.py``: x / 255 * 2 - 1, no noise), through Chainer's SerialIterator.
- Recording: the updaters' ``get_batch`` (real batches), the latent / label samplers (z and fake
  labels, in call order: the G step's, then each D step's) and ``chainer.reporter.report`` (losses).
- The training runs in a real ``chainer.training.Trainer`` with the official ``LinearShift`` extensions
  (sngan_projection ``train.py``); the total iteration count is set small (``--decay-iterations``) so
  the decay is visible within K iterations, and the fixture's overrides set ``train.steps`` to it.

``--dtype float32`` runs the reference in its own float32 (for measuring float32 drift; the arrays are
still stored as float64 and ``meta.dtype`` says float32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

SP_COMMIT = "pfnet-research/sngan_projection@e84b1a5"
CGL_COMMIT = "pfnet-research/chainer-gan-lib@cf9efba"


def fail(msg: str) -> "None":
    print(f"make_official: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- Chainer helpers

def cast_model(model, dtype) -> None:
    """Every float parameter and persistent array of ``model`` to ``dtype``."""
    for p in model.params():
        if p.array is not None and p.array.dtype.kind == "f":
            p.array = p.array.astype(dtype)
    for link in model.links():
        for name in link._persistent:
            value = getattr(link, name)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                setattr(link, name, value.astype(dtype))


def resolve(model, path: str):
    """``model`` attribute at a dotted path (``block2.c1.W``) as a numpy array."""
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    arr = getattr(obj, "array", obj)
    return np.array(arr, dtype=np.float64, copy=True)


class Recorder:
    """Inputs and losses of the reference run, in call order."""

    def __init__(self):
        self.real, self.real_y, self.z, self.y, self.losses = [], [], [], [], []

    def wrap_report(self, chainer):
        original = chainer.reporter.report

        def report(values, observer=None):
            for key in ("loss_gen", "loss_dis"):
                if key in values:
                    v = values[key]
                    self.losses.append((key, float(np.asarray(getattr(v, "array", v)))))
            return original(values, observer) if observer is not None else original(values)
        chainer.reporter.report = report
        return original


def casting_variable(chainer, dtype):
    """``chainer.Variable`` that casts a float array to ``dtype`` (the updaters' ``astype("f")``)."""
    def Variable(data=None, **kwargs):
        if isinstance(data, np.ndarray) and data.dtype.kind == "f":
            data = data.astype(dtype)
        return chainer.Variable(data, **kwargs)
    return Variable


def new_trainer(chainer, updater, iterations: int, out: str):
    from chainer import training
    return training.Trainer(updater, (iterations, "iteration"), out=out)


def collect(model, mapping: dict, transforms: dict = None) -> dict:
    """{our key: reference array} for one model (``mapping``: our key -> reference path)."""
    out = {}
    for ours, ref in mapping.items():
        arr = resolve(model, ref)
        if transforms and ours in transforms:
            arr = transforms[ours](arr)
        if ours.endswith("._u"):
            arr = arr.reshape(-1)
        out[ours] = arr
    return out


def sn(ours: str, ref: str, bias: bool = True) -> dict:
    m = {f"{ours}.parametrizations.weight.original": f"{ref}.W",
         f"{ours}.parametrizations.weight.0._u": f"{ref}.u"}
    if bias:
        m[f"{ours}.bias"] = f"{ref}.b"
    return m


def plain(ours: str, ref: str, bias: bool = True) -> dict:
    m = {f"{ours}.weight": f"{ref}.W"}
    if bias:
        m[f"{ours}.bias"] = f"{ref}.b"
    return m


def bn(ours: str, ref: str, conditional: bool) -> dict:
    """Our ConditionalBatchNorm2d / GBatchNorm2d at ``ours`` from a Chainer (conditional) BN at ``ref``."""
    if conditional:
        return {f"{ours}.gamma.weight": f"{ref}.gammas.W", f"{ours}.beta.weight": f"{ref}.betas.W",
                f"{ours}.bn.running_mean": f"{ref}.avg_mean", f"{ours}.bn.running_var": f"{ref}.avg_var"}
    return {f"{ours}.bn.weight": f"{ref}.gamma", f"{ours}.bn.bias": f"{ref}.beta",
            f"{ours}.bn.running_mean": f"{ref}.avg_mean", f"{ours}.bn.running_var": f"{ref}.avg_var"}


def plain_bn(ours: str, ref: str) -> dict:
    return {f"{ours}.weight": f"{ref}.gamma", f"{ours}.bias": f"{ref}.beta",
            f"{ours}.running_mean": f"{ref}.avg_mean", f"{ours}.running_var": f"{ref}.avg_var"}


def check_shapes(name: str, arrays: dict, model) -> None:
    """Every reference parameter is mapped exactly once (nothing left out)."""
    n_ref = sum(1 for _ in model.params())
    n_ours = sum(1 for k in arrays if not k.endswith(("._u", "running_mean", "running_var")))
    if n_ref != n_ours:
        raise RuntimeError(f"{name}: {n_ref} reference parameters but {n_ours} mapped")


# ----------------------------------------------------------------------------- sngan_projection

def sp_maps(ch_blocks: int, conditional: bool):
    g = plain("linear", "l1")
    for i in range(ch_blocks):
        ref = f"block{i + 2}"
        g.update(bn(f"blocks.{i}.b1", f"{ref}.b1", conditional))
        g.update(plain(f"blocks.{i}.c1", f"{ref}.c1"))
        g.update(bn(f"blocks.{i}.b2", f"{ref}.b2", conditional))
        g.update(plain(f"blocks.{i}.c2", f"{ref}.c2"))
        g.update(plain(f"blocks.{i}.c_sc", f"{ref}.c_sc"))
    g.update(plain_bn("bn", "b5"))
    g.update(plain("conv", "c5"))
    d = {}
    d.update(sn("blocks.0.c1", "block1.c1"))
    d.update(sn("blocks.0.c2", "block1.c2"))
    d.update(sn("blocks.0.c_sc", "block1.c_sc"))
    d.update(sn("blocks.1.c1", "block2.c1"))
    d.update(sn("blocks.1.c2", "block2.c2"))
    d.update(sn("blocks.1.c_sc", "block2.c_sc"))
    for i in (2, 3):
        d.update(sn(f"blocks.{i}.c1", f"block{i + 1}.c1"))
        d.update(sn(f"blocks.{i}.c2", f"block{i + 1}.c2"))
    d.update(sn("head.linear", "l5", bias=False))
    if conditional:
        d.update(sn("head.embed", "l_y", bias=False))
    return g, d


def run_sngan_projection(root: str, conditional: bool, dtype, K: int, ch: int, batch: int, g_batch: int,
                         decay_iterations: int, seed: int):
    import yaml
    import chainer
    from chainer.training import extensions

    chainer.global_config.dtype = dtype
    if root not in sys.path:
        sys.path.insert(0, root)
    import source.functions.max_sv as max_sv
    max_sv._l2normalize = lambda v, eps=1e-12: v / (np.sqrt((v * v).sum()) + eps)
    import gen_models.resnet_32 as gen_module
    import dis_models.snresnet_32 as dis_module
    import updater as updater_module

    config_name = "configs/sn_cifar10_conditional.yml" if conditional else "configs/sn_cifar10_unconditional.yml"
    with open(os.path.join(root, config_name)) as fh:
        config = yaml.safe_load(fh)
    gen_args = dict(config["models"]["generator"]["args"], ch=ch)
    dis_args = dict(config["models"]["discriminator"]["args"], ch=ch)
    upd_args = dict(config["updater"]["args"], n_gen_samples=g_batch)
    adam = config["adam"]
    n_dis = upd_args["n_dis"]

    np.random.seed(seed)
    gen = gen_module.ResNetGenerator(**gen_args)
    dis = dis_module.SNResNetProjectionDiscriminator(**dis_args)
    cast_model(gen, dtype)
    cast_model(dis, dtype)
    g_map, d_map = sp_maps(3, conditional)
    init = {"G": collect(gen, g_map), "D": collect(dis, d_map)}
    check_shapes("sngan_projection G", init["G"], gen)
    check_shapes("sngan_projection D", init["D"], dis)

    opt_gen = chainer.optimizers.Adam(alpha=adam["alpha"], beta1=adam["beta1"], beta2=adam["beta2"])
    opt_gen.setup(gen)
    opt_dis = chainer.optimizers.Adam(alpha=adam["alpha"], beta1=adam["beta1"], beta2=adam["beta2"])
    opt_dis.setup(dis)

    n_images = K * n_dis * batch
    rng = np.random.RandomState(seed + 1)
    raw = rng.randint(0, 256, size=(n_images, 3, 32, 32)).astype(np.float64)
    labels = rng.randint(0, 10, size=n_images).astype(np.int32)

    class Dataset(chainer.dataset.DatasetMixin):
        # The transform of sngan_projection datasets/cifar10.py:20-21, in the run's dtype.
        def __len__(self):
            return n_images

        def get_example(self, i):
            image = np.asarray(raw[i] / 128. - 1., dtype)
            image += np.random.uniform(size=image.shape, low=0., high=1. / 128)
            return image, labels[i]

    iterator = chainer.iterators.SerialIterator(Dataset(), batch, shuffle=True)
    rec = Recorder()
    sample_continuous, sample_categorical = gen_module.sample_continuous, updater_module.sample_categorical

    def z_sampler(dim, batchsize, distribution="normal", xp=np):
        z = sample_continuous(dim, batchsize, distribution=distribution, xp=xp).astype(dtype)
        rec.z.append(z.copy())
        return z

    def y_sampler(n_cat, batchsize, distribution="uniform", xp=np):
        y = sample_categorical(n_cat, batchsize, distribution=distribution, xp=xp)
        rec.y.append(y.astype(np.int64))
        return y

    gen_module.sample_continuous = z_sampler
    updater_module.sample_categorical = y_sampler
    original_variable = updater_module.Variable
    updater_module.Variable = casting_variable(chainer, dtype)
    original_report = rec.wrap_report(chainer)
    try:
        kwargs = dict(upd_args, models={"gen": gen, "dis": dis}, iterator=iterator,
                      optimizer={"opt_gen": opt_gen, "opt_dis": opt_dis})
        upd = updater_module.Updater(**kwargs)
        get_batch = upd.get_batch

        def recorded_batch(xp):
            x, y = get_batch(xp)
            rec.real.append(np.array(x.array, dtype=np.float64))
            if y is not None:
                rec.real_y.append(np.array(y.array, dtype=np.int64))
            return x, y
        upd.get_batch = recorded_batch
        with tempfile.TemporaryDirectory() as out:
            trainer = new_trainer(chainer, upd, K, out)
            # sngan_projection train.py: alpha decays linearly from the config's alpha to 0 between
            # iteration_decay_start and iteration (here: decay_iterations, to see it within K).
            for opt in (opt_gen, opt_dis):
                trainer.extend(extensions.LinearShift(
                    "alpha", (adam["alpha"], 0.), (config["iteration_decay_start"], decay_iterations), opt))
            trainer.run()
    finally:
        chainer.reporter.report = original_report
        gen_module.sample_continuous = sample_continuous
        updater_module.sample_categorical = sample_categorical
        updater_module.Variable = original_variable
    final = {"G": collect(gen, g_map), "D": collect(dis, d_map)}

    # Split the recorded calls per iteration: G step first (one z, one y), then n_dis D steps.
    zs = rec.z
    if len(zs) != K * (1 + n_dis) or len(rec.real) != K * n_dis:
        raise RuntimeError(f"recorded {len(zs)} latent draws and {len(rec.real)} real batches; "
                           f"expected {K * (1 + n_dis)} and {K * n_dis}")
    per = 1 + n_dis
    arrays = {
        "in/g_z": np.stack([zs[k * per] for k in range(K)]),
        "in/d_z": np.stack([np.stack(zs[k * per + 1:(k + 1) * per]) for k in range(K)]),
        "in/d_x": np.stack(rec.real).reshape(K, n_dis, batch, 3, 32, 32),
    }
    if conditional:
        ys = rec.y
        arrays["in/g_y"] = np.stack([ys[k * per] for k in range(K)])
        arrays["in/d_yf"] = np.stack([np.stack(ys[k * per + 1:(k + 1) * per]) for k in range(K)])
        arrays["in/d_y"] = np.stack(rec.real_y).reshape(K, n_dis, batch)
    g_losses = [v for k, v in rec.losses if k == "loss_gen"]
    d_losses = [v for k, v in rec.losses if k == "loss_dis"]
    arrays["loss/g"] = np.array(g_losses, dtype=np.float64)
    arrays["loss/d"] = np.array(d_losses, dtype=np.float64).reshape(K, n_dis)
    param_map = {**{f"G/{k}": v for k, v in g_map.items()}, **{f"D/{k}": v for k, v in d_map.items()}}
    overrides = [f"model.g_ch={ch}", f"model.d_ch={ch}", f"train.batch_size={batch}",
                 f"train.g_batch_size={g_batch}", f"train.n_dis={n_dis}", f"train.steps={decay_iterations}",
                 f"model.z_dim={gen_args['dim_z']}"]
    meta = {"reference": SP_COMMIT, "reference_config": config_name,
            "experiment": "cifar10_projection" if conditional else "cifar10_sngan_hinge_resnet",
            "overrides": overrides, "iterations": K, "n_dis": n_dis, "order": "g_first",
            "param_map": param_map, "adam_alpha": adam["alpha"]}
    return init, final, arrays, meta


# ----------------------------------------------------------------------------- chainer-gan-lib

def cgl_maps(g_feature_bn: bool = True):
    g = plain("linear", "l0")
    g.update(bn("bns.0", "bn0", conditional=False))
    for i in range(3):
        g.update(plain(f"deconvs.{i}", f"dc{i + 1}"))
        g.update(bn(f"bns.{i + 1}", f"bn{i + 1}", conditional=False))
    g.update(plain("out", "dc4"))
    d = {}
    for i, name in enumerate(("c0_0", "c0_1", "c1_0", "c1_1", "c2_0", "c2_1", "c3_0")):
        d.update(sn(f"convs.{2 * i}", name))
    d.update(sn("head.linear", "l4"))
    return g, d


def deconv3x3_as_conv(w: np.ndarray) -> np.ndarray:
    """A 3x3 stride-1 pad-1 deconvolution (W: in, out, kh, kw) is the convolution with the kernel
    flipped and the channel axes swapped: our Conv2d weight (out, in, kh, kw)."""
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def run_chainer_gan_lib(root: str, dtype, K: int, g_ch: int, d_ch: int, z_dim: int, batch: int, seed: int,
                        n_dis: int = 1, beta1: float = 0.5, beta2: float = 0.999, alpha: float = 2e-4):
    import chainer

    chainer.global_config.dtype = dtype
    for p in (root, os.path.join(root, "common")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import common.net as net
    import stdgan.updater as updater_module

    np.random.seed(seed)
    # example.sh: --algorithm stdgan --architecture sndcgan; train.py builds DCGANGenerator() and
    # SNDCGANDiscriminator() (here with smaller ch / n_hidden).
    gen = net.DCGANGenerator(n_hidden=z_dim, ch=g_ch * 8)
    dis = net.SNDCGANDiscriminator(ch=d_ch * 8)
    sn_links = [getattr(dis, n) for n in ("c0_0", "c0_1", "c1_0", "c1_1", "c2_0", "c2_1", "c3_0", "l4")]
    for link in sn_links:   # the u that max_singular_value would draw at the first forward
        link.u = np.random.normal(size=(1, link.W.shape[0])).astype(dtype)
    cast_model(gen, dtype)
    cast_model(dis, dtype)
    g_map, d_map = cgl_maps()
    transforms = {"out.weight": deconv3x3_as_conv}
    init = {"G": collect(gen, g_map, transforms), "D": collect(dis, d_map)}
    check_shapes("chainer-gan-lib G", init["G"], gen)
    check_shapes("chainer-gan-lib D", init["D"], dis)

    opt_gen = chainer.optimizers.Adam(alpha=alpha, beta1=beta1, beta2=beta2)
    opt_gen.setup(gen)
    opt_dis = chainer.optimizers.Adam(alpha=alpha, beta1=beta1, beta2=beta2)
    opt_dis.setup(dis)

    n_images = K * n_dis * batch
    rng = np.random.RandomState(seed + 1)
    raw = rng.randint(0, 256, size=(n_images, 3, 32, 32)).astype(np.float64)

    class Dataset(chainer.dataset.DatasetMixin):
        # common/dataset.py: get_cifar10(scale=1.0) (x / 255), then * 2 - 1; in the run's dtype.
        def __len__(self):
            return n_images

        def get_example(self, i):
            return np.asarray(raw[i] / 255., dtype) * 2 - 1.0

    iterator = chainer.iterators.SerialIterator(Dataset(), batch, shuffle=True)
    rec = Recorder()
    make_hidden = gen.make_hidden

    def recorded_hidden(batchsize):
        z = make_hidden(batchsize).astype(dtype)
        rec.z.append(z.reshape(batchsize, -1).copy())
        return z
    gen.make_hidden = recorded_hidden
    variable = casting_variable(chainer, dtype)

    def recorded_variable(data=None, **kwargs):
        v = variable(data, **kwargs)
        if v.ndim == 4 and v.shape[1:] == (3, 32, 32):   # update_core's x_real
            rec.real.append(np.array(v.array, dtype=np.float64))
        return v
    original_variable = updater_module.Variable
    updater_module.Variable = recorded_variable
    original_report = rec.wrap_report(chainer)
    try:
        upd = updater_module.Updater(models=(gen, dis), n_dis=n_dis, iterator={"main": iterator},
                                     optimizer={"opt_gen": opt_gen, "opt_dis": opt_dis}, device=-1)
        with tempfile.TemporaryDirectory() as out:
            new_trainer(chainer, upd, K, out).run()   # train.py: no LR schedule for stdgan
    finally:
        chainer.reporter.report = original_report
        updater_module.Variable = original_variable
    final = {"G": collect(gen, g_map, transforms), "D": collect(dis, d_map)}

    per = 1 + n_dis
    zs = rec.z
    if len(zs) != K * per or len(rec.real) != K * n_dis:
        raise RuntimeError(f"recorded {len(zs)} latent draws and {len(rec.real)} real batches")
    arrays = {
        "in/g_z": np.stack([zs[k * per] for k in range(K)]),
        "in/d_z": np.stack([np.stack(zs[k * per + 1:(k + 1) * per]) for k in range(K)]),
        "in/d_x": np.stack(rec.real).reshape(K, n_dis, batch, 3, 32, 32),
        "loss/g": np.array([v for k, v in rec.losses if k == "loss_gen"], dtype=np.float64),
        "loss/d": np.array([v for k, v in rec.losses if k == "loss_dis"], dtype=np.float64).reshape(K, n_dis),
    }
    param_map = {**{f"G/{k}": v for k, v in g_map.items()}, **{f"D/{k}": v for k, v in d_map.items()}}
    param_map["G/out.weight"] = "dc4.W transposed (1, 0, 2, 3) and flipped in kh, kw (3x3 stride-1 deconv = conv)"
    overrides = [f"model.g_ch={g_ch}", f"model.d_ch={d_ch}", f"model.z_dim={z_dim}", f"train.batch_size={batch}",
                 f"train.g_batch_size={batch}", f"train.n_dis={n_dis}", f"train.steps={K}"]
    meta = {"reference": CGL_COMMIT,
            "reference_config": "example.sh:8 (train.py --algorithm stdgan --architecture sndcgan --n_dis 1 "
                                "--adam_beta1 0.5 --adam_beta2 0.999)",
            "experiment": "cifar10_sngan_cnn", "overrides": overrides, "iterations": K, "n_dis": n_dis,
            "order": "g_first", "param_map": param_map, "adam_alpha": alpha}
    return init, final, arrays, meta


# ----------------------------------------------------------------------------- output

def rounding_noise(init, final, step: float) -> dict:
    """Parameters that moved by less than 1e-4 of one Adam step over the whole run.

    Their gradient is zero in exact arithmetic: a bias whose output reaches the loss only through a
    batch-statistics BatchNorm (which removes any per-channel constant). What the reference computes
    for them is rounding noise (~1e-17), which Adam turns into updates of lr * g / eps, so their final
    values (~1e-11 and below) are noise of the implementation, not of the algorithm: compare them on
    an absolute scale, not relative to themselves."""
    out = {}
    for who in ("G", "D"):
        for key, value in init[who].items():
            if key.endswith(("._u", "running_mean", "running_var")):
                continue
            moved = float(np.max(np.abs(final[who][key] - value)))
            if moved < 1e-4 * step:
                out[f"{who}/{key}"] = moved
    return out


def compact(a: np.ndarray) -> np.ndarray:
    """An input array the reference fed as float32 values (its real images) is stored as float32:
    the same numbers in half the bytes; the replay casts inputs to its own dtype."""
    a32 = a.astype(np.float32)
    return a32 if np.array_equal(a32.astype(np.float64), a) else a


def write_fixture(path: str, name: str, init, final, arrays, meta, dtype_name: str, command: str) -> None:
    import chainer
    meta = dict(meta, name=name, dtype=dtype_name, command=command,
                reference_runtime=f"chainer {chainer.__version__}, numpy {np.__version__}, CPU")
    meta["zero_gradient"] = sorted(rounding_noise(init, final, meta.pop("adam_alpha")))
    meta["zero_gradient_note"] = ("parameters whose gradient is zero in exact arithmetic (a bias followed only by "
                                  "batch-statistics BatchNorm); their final values are the reference's rounding "
                                  "noise amplified by Adam (lr * g / eps): compare them on an absolute scale")
    out = {"meta": np.array(json.dumps(meta))}
    for who in ("G", "D"):
        for k, v in init[who].items():
            out[f"{who}/{k}"] = np.asarray(v, dtype=np.float64)
        for k, v in final[who].items():
            out[f"final/{who}/{k}"] = np.asarray(v, dtype=np.float64)
    for k, v in arrays.items():
        out[k] = v.astype(np.int64) if v.dtype.kind in "iu" else compact(v.astype(np.float64))
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB); zero-gradient tensors: {meta['zero_gradient']}")
    print(f"  param map ({name}): our key <- reference parameter")
    for ours, ref in meta["param_map"].items():
        print(f"    {ours:55s} <- {ref}")


PAIRS = ("official_sngan_hinge_resnet", "official_projection", "official_sngan_cnn")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sngan-projection", required=True, help="clone of pfnet-research/sngan_projection")
    ap.add_argument("--chainer-gan-lib", required=True, help="clone of pfnet-research/chainer-gan-lib")
    ap.add_argument("--out", required=True, help="folder for the .npz fixtures")
    ap.add_argument("--only", action="append", choices=PAIRS, help="write only these fixtures (repeatable)")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                    help="precision of the reference run (float32: only to measure float32 drift)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for flag, path, probe in (("--sngan-projection", args.sngan_projection, "updater.py"),
                              ("--chainer-gan-lib", args.chainer_gan_lib, "stdgan/updater.py")):
        if not os.path.isfile(os.path.join(path, probe)):
            fail(f"{flag} {path!r} has no {probe}; pass the root of a clone of that repository")
    try:
        import chainer  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        fail(f"{exc.name} is not importable; run this with the Chainer environment "
             f"(e.g. /tmp/chainer-venv/bin/python; pip install chainer==7.8.1 pyyaml)")
    os.makedirs(args.out, exist_ok=True)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    # "python": the Chainer environment's interpreter.
    command = " ".join(["python", "tests/golden/make_official.py", "--sngan-projection", args.sngan_projection,
                        "--chainer-gan-lib", args.chainer_gan_lib, "--out", args.out]
                       + ([] if args.dtype == "float64" else ["--dtype", args.dtype]))
    wanted = args.only or PAIRS
    sp, cgl = os.path.abspath(args.sngan_projection), os.path.abspath(args.chainer_gan_lib)
    for name in PAIRS:
        if name not in wanted:
            continue
        if name == "official_sngan_cnn":
            result = run_chainer_gan_lib(cgl, dtype, K=10, g_ch=8, d_ch=8, z_dim=32, batch=4, seed=args.seed)
        else:
            result = run_sngan_projection(sp, name == "official_projection", dtype, K=5, ch=16, batch=4,
                                          g_batch=8, decay_iterations=10, seed=args.seed)
        write_fixture(os.path.join(args.out, f"{name}.npz"), name, *result, args.dtype, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
