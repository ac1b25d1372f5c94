"""Data configuration: the `data.*` section of an experiment (owned here, composed by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass, field


# Bounds are declared beside each field as ``metadata`` (the keys of ``trainer.config.bounded``:
# low / high with *_open for a strict end, or choices); the trainer's config checks read them.


@dataclass
class DataConfig:
    # synthetic: the embedded, procedurally generated shapes dataset (no files needed)
    # webdataset: tar shards written by `python -m data_pipelines.prepare ... --format webdataset`
    # ffcv: a .beton written by `python -m data_pipelines.prepare ... --format ffcv` (optional extra)
    backend: str = field(default="synthetic", metadata={"choices": ("synthetic", "webdataset", "ffcv")})
    # Shards: a folder holding a manifest.json, a brace pattern or a glob, or what WebDataset opens:
    # http(s)://host/shard-{000000..001023}.tar, pipe:COMMAND (e.g. pipe:aws s3 cp s3://b/x.tar -),
    # a manifest's URL; FFCV: the .beton file.
    path: str = ""
    resolution: int = field(default=32, metadata={"low": 1, "high": 4096})
    # Loader worker processes per rank (0 = load in the training process).
    num_workers: int = field(default=2, metadata={"low": 0, "high": 256})
    shuffle_buffer: int = field(default=2000, metadata={"low": 1})
    # The SN-GAN paper trains without augmentation; horizontal flips are a common option.
    random_flip: bool = False
    # Random square crop of this fraction of the short side, resized back to data.resolution
    # (the official 256 px dogs-and-cats setting uses 0.9 with flips; 128 px ImageNet none); 1.0 = no crop.
    random_crop_ratio: float = field(default=1.0, metadata={"low": 0.0, "low_open": True, "high": 1.0})
    # Check the shards against manifest.json before training: quick (size, header hash and tar
    # header of every shard: one small read each), full (the sha256 of every byte, in parallel), or
    # off (train on whatever is there; damaged samples are skipped and counted).
    verify: str = field(default="quick", metadata={"choices": ("off", "quick", "full")})
    # Pixel scaling fed to D: x / pixel_scale - 1. 127.5 maps [0, 255] onto [-1, 1] exactly; the
    # official Chainer code uses 128 plus uniform noise in [0, 1/128) (dequantize=true), which
    # experiments that reproduce its results set. The noise is U[0, 1/128) at either scale
    # (127.5 + dequantize: pytorch-gan-collections' SN-GAN transform).
    pixel_scale: float = field(default=127.5, metadata={"low": 127.5, "high": 128.0})
    dequantize: bool = False
    # Number of distinct images of the synthetic dataset (sample i is a pure function of (seed, i)).
    synthetic_size: int = field(default=50000, metadata={"low": 1})
    synthetic_seed: int = 0
