"""Alias: ``python -m eval.compare`` runs ``python -m launch.compare`` (the study runner moved there:
it trains models, so it is a launcher, not part of the evaluator). Nothing is imported from launch/
unless this runs as a command, so the evaluator package never imports the training code.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("launch.compare", run_name="__main__", alter_sys=True)
