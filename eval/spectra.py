"""Alias: ``python -m eval.spectra`` runs ``python -m eval.analysis.spectra`` (the tool moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("eval.analysis.spectra", run_name="__main__", alter_sys=True)
