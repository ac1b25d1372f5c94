"""Alias: ``python -m eval.grids`` runs ``python -m eval.analysis.grids`` (the tool moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("eval.analysis.grids", run_name="__main__", alter_sys=True)
