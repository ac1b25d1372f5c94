"""Statistics reported from anywhere, reduced across ranks once per logging tick.

``Collector.report(name, value)`` accumulates a running sum and count on the device (no sync);
``Collector.reduce()`` all-reduces every series in one call and returns per-name means. Only the
main rank writes them (``MetricsWriter``: ``metrics.jsonl`` and TensorBoard).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from . import dist


class Collector:
    def __init__(self, device: torch.device):
        self.device = device
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}

    def report(self, name: str, value) -> None:
        v = value.detach().float().mean() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        v = v.to(self.device)
        if name in self._sums:
            self._sums[name] += v
            self._counts[name] += 1
        else:
            self._sums[name] = v.clone()
            self._counts[name] = 1

    def reduce(self) -> Dict[str, float]:
        """Mean of every series over this tick, over all ranks. Must be called on every rank."""
        # Ranks may have reported different names (rare); agree on the main rank's list.
        names = dist.broadcast_object(sorted(self._sums))
        if not names:
            return {}
        packed = torch.stack([self._sums.get(n, torch.zeros((), device=self.device)) for n in names]
                             + [torch.tensor(float(self._counts.get(n, 0)), device=self.device) for n in names])
        dist.all_reduce_(packed)
        k = len(names)
        sums, counts = packed[:k].tolist(), packed[k:].tolist()
        self._sums.clear()
        self._counts.clear()
        return {n: s / c for n, s, c in zip(names, sums, counts) if c > 0}


TRACKERS = ("tensorboard", "wandb", "mlflow")


def parse_log_with(text: str) -> Tuple[str, ...]:
    """``train.log_with``: a comma-separated subset of tensorboard, wandb, mlflow (``none``: only
    metrics.jsonl)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"train.log_with={text!r}: unknown tracker(s) {bad}; choose from {', '.join(TRACKERS)} or none")
    return names


class _Trackers:
    """The experiment trackers of a run, through accelerate's tracker API (``accelerate.tracking``):
    TensorBoard in ``RUN_DIR/tb``, W&B with its files in ``RUN_DIR/wandb`` (``WANDB_MODE=offline``
    works without a network), MLflow with the tracking store in ``RUN_DIR/mlruns`` unless
    ``MLFLOW_TRACKING_URI`` says otherwise. The W&B and MLflow run ids are kept in
    ``RUN_DIR/trackers.json``, so a resumed run logs into the same runs."""

    def __init__(self, names, run_dir: str, name: str, config: Optional[dict]):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
        self.run_dir = run_dir
        ids_path = os.path.join(run_dir, "trackers.json")
        try:
            with open(ids_path) as fh:
                ids = json.load(fh)
        except (OSError, ValueError):
            ids = {}
        self.trackers = []
        for tracker_name in names:
            if tracker_name == "tensorboard":
                tracker = TensorBoardTracker("tb", run_dir)
            elif tracker_name == "wandb":
                import uuid
                run_id = ids.get("wandb") or uuid.uuid4().hex[:8]
                ids["wandb"] = run_id
                tracker = WandBTracker(name, dir=run_dir, id=run_id, resume="allow",
                                       name=os.path.basename(os.path.abspath(run_dir)))
            else:
                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    # A file store inside the run folder (MLflow 3 asks for an explicit opt-in to it).
                    os.environ["MLFLOW_TRACKING_URI"] = "file:" + os.path.join(os.path.abspath(run_dir), "mlruns")
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                tracker = MLflowTracker(name, run_id=ids.get("mlflow"),
                                        run_name=os.path.basename(os.path.abspath(run_dir)))
            tracker.start()
            if tracker_name == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            if config is not None and not ids.get(f"{tracker_name}_config"):
                tracker.store_init_configuration(config)
                ids[f"{tracker_name}_config"] = True
            self.trackers.append((tracker_name, tracker))
        with open(ids_path, "w") as fh:
            json.dump(ids, fh)

    def log(self, values: Dict[str, float], step: int) -> None:
        for _, tracker in self.trackers:
            tracker.log(values, step=step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """``grid``: float [3, H, W] in [0, 1]."""
        hwc = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        for name, tracker in self.trackers:
            if name == "tensorboard":
                tracker.log_images({tag: grid[None]}, step=step)
            elif name == "wandb":
                tracker.log_images({tag: [hwc]}, step=step)
            else:
                import mlflow
                mlflow.log_image(hwc, artifact_file=f"{tag}/step-{step:09d}.png")

    def close(self) -> None:
        for _, tracker in self.trackers:
            tracker.finish()
        self.trackers = []


class MetricsWriter:
    """metrics.jsonl and the experiment trackers (``train.log_with``) on the main rank; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool, log_with=("tensorboard",), name: str = "sngan",
                 config: Optional[dict] = None):
        self.enabled = enabled
        self._trackers = None
        self._jsonl = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
            self._trackers = _Trackers(log_with, run_dir, name, config)

    def write(self, step: int, values: Dict[str, float], extra: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **(extra or {}), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._trackers.log(values, step)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._trackers.image(tag, image, step)

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._trackers.close()
            self._jsonl.close()
            self._jsonl = None
