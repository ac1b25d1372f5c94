"""Evaluation: Inception feature extractors, distributed feature statistics, FID / IS / KID /
intra-FID, reference statistics, and batch evaluation of a run's checkpoints.

Entry points: ``eval/main.py`` (one checkpoint), ``python -m eval.reference`` (dataset
statistics), ``python -m eval.fid`` (two image sets), ``python -m eval.batch`` (a run). The
evaluator reads checkpoints and exported generators; it never imports the training loop.
See ``eval/README.md``.
"""
