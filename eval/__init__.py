"""Evaluation: Inception feature extractors, distributed feature statistics, FID / IS / KID /
intra-FID, reference statistics, and batch evaluation of a run's checkpoints.

Entry points: ``eval/main.py`` (one checkpoint), ``python -m eval.reference`` (dataset
statistics), ``python -m eval.fid`` (two image sets), ``python -m eval.batch`` (a run),
``python -m eval.sample``. The evaluator reads checkpoints and exported generators; of trainer/ it
loads only the shared plumbing (``trainer.dist``, ``trainer.errors``), never the training loop
(``tests/test_imports.py``). The analysis tools are in ``eval/analysis/``; the comparison-study
runner, which trains, is ``launch/compare.py`` (``eval/{spectra,neighbors,grids,compare}.py`` are
command aliases only). See ``eval/README.md`` and ARCHITECTURE.md.
"""
