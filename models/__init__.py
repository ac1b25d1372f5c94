"""SN-GAN model zoo: spectral normalization, layers, generators and discriminators, and a registry.

Model code never imports trainer, launch or eval code and never sees DDP or accelerate.
"""

from .registry import (build_discriminator, build_generator, discriminator_names, generator_names,
                       register_discriminator, register_generator)
from .spectral_norm import configure_spectral_norm, sigmas, spectral_norm, spectral_norm_layers
from .layers import (NORMS, ConditionalBatchNorm2d, DLayers, GBatchNorm2d, ProjectionHead, apply_norm, set_bn_eps,
                     set_bn_splits)
from .layers import Z_DISTS, sample_z

# Importing the architecture modules registers their builders.
from . import cnn, resnet, seeds  # noqa: F401  (isort: skip)

__all__ = ["build_generator", "build_discriminator", "generator_names", "discriminator_names",
           "register_generator", "register_discriminator", "spectral_norm", "spectral_norm_layers",
           "sigmas", "NORMS", "apply_norm", "DLayers", "ConditionalBatchNorm2d", "GBatchNorm2d", "set_bn_splits",
           "ProjectionHead", "configure_spectral_norm", "set_bn_eps", "Z_DISTS", "sample_z"]
