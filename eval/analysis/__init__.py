"""Analysis tools: D's singular-value spectra (``spectra``), nearest training images of samples
(``neighbors``), sample grids, interpolations and class morphs (``grids``), and D rebuilt from a
checkpoint (``discriminator``).

They stand apart from the evaluator proper (eval/): nothing in the evaluator imports them, and they
may read what only training writes (D's weights and its config through ``trainer.checkpoint`` and
``trainer.build``); none imports the training loop. See ARCHITECTURE.md.
"""
