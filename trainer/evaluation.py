"""FID while training (``train.eval_every``) and the run's best checkpoint.

The trainer never scores anything itself: every ``eval_every``-th checkpoint (and the last one) is
evaluated by the separate evaluator, ``python -m eval.batch RUN_DIR --watch --every-steps S
--final-step N``, started by rank 0 as a background process on the same machine (on the CPU, or on
a GPU of its own with ``train.eval_device``), or, under ``launch/slurm.py``, as its own SLURM job
(then ``SNGAN_EVAL_EXTERNAL=1`` tells the trainer not to start one). The evaluator appends its
results to ``RUN_DIR/eval.jsonl``; the trainer reads new lines at each logging tick and

- writes ``eval/<metric>`` at the checkpoint's step into ``metrics.jsonl`` and the trackers;
- keeps ``RUN_DIR/best`` (a symlink to ``checkpoints/ckpt-<step>``) and ``RUN_DIR/best.json`` on the
  checkpoint with the best ``train.eval_metric`` (lowest FID / KID / intra-FID, highest IS);
- protects the best checkpoint, and those still waiting for their evaluation, from pruning
  (``train.keep_ckpts``).

At the end of training it waits for the evaluation of the final checkpoint and its last line states
the final and the best score. A stop signal (exit 75) stops the evaluator; the rerun starts a new
one, which takes up the checkpoints not yet evaluated (``eval.batch``'s claims).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

HIGHER_IS_BETTER = {"is"}
EXTERNAL_ENV = "SNGAN_EVAL_EXTERNAL"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluator_args(cfg, run_dir: str) -> List[str]:
    """The ``eval.batch`` arguments of this run's in-training evaluation (also used by
    launch/slurm.py for the evaluation job)."""
    t = cfg.train
    every = t.eval_every * t.ckpt_every
    cmd = [os.path.abspath(run_dir), "--watch", "--interval", "5",
           "--every-steps", str(every), "--final-step", str(t.steps), "--no-tensorboard",
           "--metrics", t.eval_metric if t.eval_metric != "is" else "fid,is",
           "--num-samples", str(t.eval_num_samples), "--extractor", t.eval_extractor,
           "--per-class", str(max(2, t.eval_num_samples // max(1, cfg.model.num_classes or 1)))]
    if t.eval_ref:
        cmd += ["--ref", os.path.abspath(t.eval_ref)]
    return cmd


def evaluator_command(cfg, run_dir: str) -> List[str]:
    return [sys.executable, "-m", "eval.batch", *evaluator_args(cfg, run_dir)]


class InTrainingEval:
    """Rank 0's side of ``train.eval_every`` (a no-op object when it is 0)."""

    def __init__(self, cfg, run_dir: str, enabled: bool):
        t = cfg.train
        self.cfg, self.run_dir = cfg, run_dir
        self.enabled = enabled and t.eval_every > 0
        self.every_steps = t.eval_every * t.ckpt_every
        self.metric = t.eval_metric
        self.proc: Optional[subprocess.Popen] = None
        self._offset = 0
        self.results: Dict[int, dict] = {}     # step -> record with the metric
        self.done: set = set()                 # steps with any record (scored, failed or skipped)
        self.best = self._read_best()

    # ------------------------------------------------------------------ the evaluator process
    def start(self) -> None:
        if not self.enabled or os.environ.get(EXTERNAL_ENV):
            return
        env = dict(os.environ)
        device = self.cfg.train.eval_device
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)   # one process of its own, not a rank of the training job
        log = open(os.path.join(self.run_dir, "eval.log"), "a")
        self.proc = subprocess.Popen(evaluator_command(self.cfg, self.run_dir), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=env, start_new_session=True)
        log.close()
        k = self.cfg.train.eval_every
        which = "every checkpoint" if k == 1 else f"every {k} checkpoints (each {self.every_steps} steps)"
        print(f"[trainer] in-training evaluation: {self.metric} of {which} and the last, by pid {self.proc.pid} "
              f"(log: {os.path.join(self.run_dir, 'eval.log')})", flush=True)

    def stop(self) -> None:
        """Stop the evaluator (the run is stopping early); its claim is released."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def wait(self, final_step: int, timeout: float = 24 * 3600.0) -> None:
        """Wait until the evaluator has scored the final checkpoint (it then exits by itself)."""
        if not self.enabled or self.proc is None:
            return
        deadline = time.time() + timeout
        print(f"[trainer] waiting for the evaluation of step {final_step} (pid {self.proc.pid})", flush=True)
        while self.proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        if self.proc.poll() is None:
            self.stop()

    def summary(self, final_step: int) -> Optional[str]:
        """The last line: the final and the best score (call after :meth:`poll`)."""
        if not self.enabled:
            return None
        final = self.results.get(final_step)
        if final is None or self.metric not in final:
            if os.environ.get(EXTERNAL_ENV):
                return f"[trainer] the final evaluation runs in its own job; results in {self.run_dir}/eval.jsonl"
            return f"[trainer] warning: no evaluation of step {final_step} (see {self.run_dir}/eval.log)"
        text = f"[trainer] final {self.metric} {final[self.metric]:.4g} at step {final_step}"
        if self.best:
            text += f"; best {self.metric} {self.best['value']:.4g} at step {self.best['step']} ({self.run_dir}/best)"
        return text

    # ------------------------------------------------------------------ results
    def poll(self) -> List[dict]:
        """New results from eval.jsonl since the last call (and the best pointer updated)."""
        if not self.enabled:
            return []
        path = os.path.join(self.run_dir, "eval.jsonl")
        if not os.path.isfile(path):
            return []
        new = []
        with open(path) as fh:
            fh.seek(self._offset)
            while True:
                line = fh.readline()
                if not line.endswith("\n"):
                    break          # a line being written: read it next time
                self._offset = fh.tell()
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                try:
                    step = int(rec["step"]) if rec.get("step") is not None else int(rec["checkpoint"].rsplit("-", 1)[-1])
                except (KeyError, ValueError, AttributeError):
                    continue
                self.done.add(step)
                if self.metric not in rec:
                    continue
                rec["step"] = step
                self.results[int(rec["step"])] = rec
                new.append(rec)
                self._consider(rec)
        return new

    def scalars(self, rec: dict) -> Dict[str, float]:
        return {f"eval/{k}": float(rec[k]) for k in ("fid", "is", "kid", "intra_fid")
                if isinstance(rec.get(k), (int, float))}

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.metric in HIGHER_IS_BETTER else value < self.best["value"]

    def _consider(self, rec: dict) -> None:
        value = float(rec[self.metric])
        target = os.path.join(self.run_dir, "checkpoints", rec["checkpoint"])
        if not self._better(value) or not os.path.isdir(target):
            return
        self.best = {"checkpoint": rec["checkpoint"], "step": int(rec["step"]), "metric": self.metric,
                     "value": value, "num_samples": rec.get("num_samples"), "time": rec.get("time")}
        link = os.path.join(self.run_dir, "best")
        tmp = link + f".tmp-{os.getpid()}"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.join("checkpoints", rec["checkpoint"]), tmp)
        os.replace(tmp, link)
        with open(os.path.join(self.run_dir, "best.json.tmp"), "w") as fh:
            json.dump(self.best, fh)
        os.replace(os.path.join(self.run_dir, "best.json.tmp"), os.path.join(self.run_dir, "best.json"))

    def _read_best(self) -> Optional[dict]:
        try:
            with open(os.path.join(self.run_dir, "best.json")) as fh:
                best = json.load(fh)
            return best if best.get("metric") == self.metric else None
        except (OSError, ValueError):
            return None

    def protected(self, checkpoints: List[str]) -> List[str]:
        """Checkpoints pruning must keep: the best one, and every evaluation target not yet evaluated."""
        if not self.enabled:
            return []
        keep = [os.path.join(self.run_dir, "checkpoints", self.best["checkpoint"])] if self.best else []
        for path in checkpoints:
            step = int(os.path.basename(path).rsplit("-", 1)[-1])
            if (step % self.every_steps == 0 or step == self.cfg.train.steps) and step not in self.done:
                keep.append(path)
        return keep
