"""Import checks (ARCHITECTURE.md, "Layers"): the evaluator never loads the training code, and the
top-level packages import one way, without a cycle.

1. Every module of the evaluator proper (``eval/*.py``) is imported in a fresh interpreter; of the
   trainer package only the shared plumbing may be loaded (``trainer.dist``: ranks and process
   groups; ``trainer.errors``: exit codes and declared errors; both free of training code), never
   ``trainer.loop``, the losses, optimizers, regularizers, EMA, build or config. The analysis tools
   (``eval/analysis/``) may read D and its config from a checkpoint (``trainer.checkpoint``) but
   never load the loop. The command aliases ``eval.{spectra,grids,neighbors,compare}`` import nothing.
2. The package-level import graph, built with ``ast`` from every import statement in the source
   (function-level imports included), follows ``benchmarks -> launch -> eval -> trainer ->
   models / data_pipelines``. ``launch`` and ``eval`` form one layer in the design; inside it the
   only direction is launch -> eval (the study runner scores its rows with the evaluator, and the
   SLURM launcher submits evaluator jobs), so an eval -> launch import would be a cycle.
"""

import ast
import glob
import json
import os
import subprocess
import sys

from conftest import ROOT

PACKAGES = ("benchmarks", "launch", "eval", "trainer", "models", "data_pipelines")
ALLOWED = {
    "benchmarks": {"launch", "eval", "trainer", "models", "data_pipelines"},
    "launch": {"eval", "trainer", "models", "data_pipelines"},
    "eval": {"trainer", "models", "data_pipelines"},
    "trainer": {"models", "data_pipelines"},
    "models": set(),
    "data_pipelines": set(),
}
ALIASES = {"spectra", "grids", "neighbors", "compare"}       # eval/<name>.py: `python -m eval.<name>` only
PLUMBING = {"trainer", "trainer.dist", "trainer.errors"}     # what the evaluator may load of trainer/


def loaded_after_import(modules):
    """The project modules loaded after importing ``modules`` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}:\n"
            "    importlib.import_module(m)\n"
            f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {list(PACKAGES)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def module_names(folder):
    return sorted(f"{folder.replace('/', '.')}.{os.path.basename(p)[:-3]}"
                  for p in glob.glob(os.path.join(ROOT, folder, "*.py")) if not p.endswith("__init__.py"))


def test_evaluator_never_loads_training_code():
    evaluator = [m for m in module_names("eval") if m.split(".")[-1] not in ALIASES]
    assert {"eval.main", "eval.batch", "eval.fid", "eval.reference", "eval.sample", "eval.stats"} <= set(evaluator)
    loaded = loaded_after_import(evaluator)
    trainer = {m for m in loaded if m.split(".")[0] == "trainer"}
    if not trainer <= PLUMBING:  # name the module that pulled training code in
        culprits = {m: sorted(t for t in loaded_after_import([m]) if t.startswith("trainer") and t not in PLUMBING)
                    for m in evaluator}
        raise AssertionError(f"the evaluator loaded training code: { {m: c for m, c in culprits.items() if c} }")
    assert "trainer.loop" not in loaded and "launch" not in {m.split(".")[0] for m in loaded}


def test_analysis_tools_and_aliases_never_load_the_loop():
    analysis = module_names("eval/analysis")
    assert {"eval.analysis.spectra", "eval.analysis.neighbors", "eval.analysis.grids",
            "eval.analysis.discriminator"} <= set(analysis)
    loaded = loaded_after_import(analysis)
    assert not {"trainer.loop", "trainer.main", "trainer.losses", "trainer.optim"} & loaded, sorted(loaded)
    assert "launch" not in {m.split(".")[0] for m in loaded}
    aliases = [f"eval.{a}" for a in sorted(ALIASES)]
    assert loaded_after_import(aliases) == {"eval", *aliases}


def package_graph():
    """{(importer, imported): [files]} over every import statement of the packages' source."""
    edges = {}
    for pkg in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True):
            with open(path) as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in PACKAGES and top != pkg:
                        edges.setdefault((pkg, top), []).append(os.path.relpath(path, ROOT))
    return edges


def test_package_imports_follow_the_layers_without_a_cycle():
    edges = package_graph()
    # the graph is real: the expected downward edges exist
    assert {("eval", "trainer"), ("trainer", "models"), ("trainer", "data_pipelines"), ("launch", "trainer"),
            ("launch", "eval"), ("benchmarks", "trainer")} <= set(edges)
    upward = {e: files for e, files in edges.items() if e[1] not in ALLOWED[e[0]]}
    assert not upward, f"imports against the layers: {upward}"
    # acyclic (implied by the layer order, checked on its own): depth-first search for a back edge
    graph = {p: sorted(b for a, b in edges if a == p) for p in PACKAGES}
    state = {}

    def visit(p, path):
        state[p] = "open"
        for q in graph[p]:
            assert state.get(q) != "open", f"import cycle: {' -> '.join(path + [q])}"
            if q not in state:
                visit(q, path + [q])
        state[p] = "done"
    for p in PACKAGES:
        if p not in state:
            visit(p, [p])
