"""Alias: ``python -m eval.neighbors`` runs ``python -m eval.analysis.neighbors`` (the tool moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("eval.analysis.neighbors", run_name="__main__", alter_sys=True)
