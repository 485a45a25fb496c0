"""Metrics: one JSON line per logged step (metrics.jsonl), optional TensorBoard and Weights & Biases, and a
progress display."""
from __future__ import annotations

import json
import os
import secrets
import string
import sys
import time

from tqdm import tqdm

from fasttrain.checkpoint.files import read_json, write_json_atomic
from fasttrain.config import ConfigError, WandbConfig
from fasttrain.device import mfu_fields

WANDB_RUN_FILE = "wandb.json"  # {"id": the W&B run id}: a resumed run continues the same W&B run


def step_record(step: int, tokens_per_step: int, loss: float, lr: float, grad_norm, steps_timed: int,
                elapsed: float, flops_per_step: float, peak_flops: float | None,
                matmul_flops: float | None = None) -> dict:
    """The metrics line of a logged step; throughput and MFU over the steps since the last log line.
    mfu: model FLOP/s over peak_flops, the datasheet dense bf16 peak of all devices together;
    mfu_vs_matmul: the same over matmul_flops, the bf16 matmul rate measured on them. Left out where None."""
    elapsed = max(elapsed, 1e-9)
    record = {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": lr,
              "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
              "tokens_per_s": steps_timed * tokens_per_step / elapsed}
    record.update(mfu_fields(flops_per_step * steps_timed / elapsed, peak_flops, matmul_flops))
    return record


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a run folder or the file); a line cut by a kill is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def truncate_metrics(path: str, after_step: int) -> None:
    """On resume, drop lines logged after the checkpoint by the interrupted run (rewritten atomically)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= after_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


class WandbRun:
    """A run's metrics in Weights & Biases: every metrics.jsonl record at its step, the resolved run config.
    The W&B run id lives in RUN/wandb.json, so a resumed run continues its W&B run and sends no step twice."""

    def __init__(self, settings: WandbConfig, run_dir: str, run_config: dict, start_step: int, written: list[dict]):
        """written: the records metrics.jsonl held before this start (an interrupted run's included)."""
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb needs the wandb package: pip install 'fasttrain-repeat[wandb]' "
                              "(or remove train.wandb)") from None
        id_path = os.path.join(run_dir, WANDB_RUN_FILE)
        run_id = (read_json(id_path) or {}).get("id")
        backfill = []
        if run_id:
            # W&B got every record the interrupted run wrote; steps redone after its checkpoint keep those
            self.sent_through = max((r.get("step", 0) for r in written), default=0)
        else:  # W&B is new to this folder (perhaps turned on for a resumed run): send what is kept first
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            backfill = [r for r in written if r.get("step", 0) <= start_step]
            self.sent_through = start_step
        try:
            self.run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                                  name=settings.name or os.path.basename(os.path.abspath(run_dir)),
                                  mode=settings.mode, id=run_id, resume="allow", config=run_config,
                                  dir=os.environ.get("WANDB_DIR") or run_dir,
                                  reinit="create_new",  # the runs of a pack log from one process
                                  settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:
            raise ConfigError(f"train.wandb: W&B could not start the run: {str(e).strip().splitlines()[0]} (log in "
                              "with `wandb login`, or set train.wandb.mode offline)") from None
        write_json_atomic(id_path, {"id": run_id})  # only once W&B has the run
        for record in backfill:
            self.send(record)

    def log(self, record: dict) -> None:
        if record.get("step", 0) > self.sent_through:
            self.send(record)

    def send(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = False,
                 wandb: WandbConfig | None = None, run_config: dict | None = None, enabled: bool = True,
                 display: bool = True):
        """enabled=False: log nothing (ranks other than 0). display=False: write the files but print
        nothing (a packed run, whose group prints one line for all its runs). wandb: also send the records
        to Weights & Biases, with run_config (the resolved config) as the W&B run's config."""
        self.enabled, self.display = enabled, display
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        if wandb is not None and wandb.mode != "disabled":
            self.wandb = WandbRun(wandb, run_dir, run_config or {}, start_step, read_metrics(self.path))
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if display and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if not self.display:
            return
        if "loss" not in record:  # evaluation records are printed as they are
            msg = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)
            return
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.3g}")
            self.bar.refresh()
        else:
            mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
            mfu += f" ({record['mfu_vs_matmul']:.1%} of matmul)" if "mfu_vs_matmul" in record else ""
            print(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                  f"grad_norm {record['grad_norm']:.3g} tok/s {record['tokens_per_s']:.4g}{mfu}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        self.file.close()
