"""Per-step metrics: a progress line on the console, JSONL + TensorBoard in the run's storage, and
the end-of-run plot.

The JSONL is the run's record and lives in the run's storage, never inside checkpoints (which stay
the same small size all run long): a checkpoint only holds the log's *offset*. On resume the log
is cut back to that offset, so steps logged after the checkpoint by a group that then died are
dropped and every step appears exactly once.
- local runs: `<run>/metrics.jsonl`, appended as the run goes; the offset is its byte size.
- s3:// runs (S3 cannot append): the records since the last checkpoint are uploaded as one small
  segment `<run>/metrics/<first>-<last>.jsonl` at every checkpoint, and TensorBoard's files are
  uploaded with it; the offset is the last committed step. Nothing is left only in a spot node's /tmp.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from alip.data.storage import resolve

PLOTTED = (
    ("losses (gate-weighted)", ("loss", "loss_raw", "loss_caption")),
    # The weighted losses rise as the gates open; the unweighted InfoNCE of each path says whether
    # the model still learns.
    ("InfoNCE (unweighted)", ("infonce_raw", "infonce_caption")),
    ("gate means", ("mean_sample_weight", "mean_raw_pair_weight", "mean_caption_pair_weight")),
    ("momentum similarities", ("momentum_text_caption", "momentum_image_text", "momentum_image_caption")),
    ("W_c > W_t fraction", ("fraction_caption_over_raw",)),
)
JSONL = "metrics.jsonl"
SEGMENTS = "metrics"
TENSORBOARD = "tensorboard"


def host_records(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Turn metric dicts whose values may be 0-d device tensors into floats with ONE host transfer
    for all of them (the step itself never syncs; this runs every log_every steps)."""
    import torch

    slots = [(i, k) for i, (_, m) in enumerate(pending) for k, v in m.items() if isinstance(v, torch.Tensor)]
    out = [(step, dict(m)) for step, m in pending]
    if slots:
        values = torch.stack([pending[i][1][k].detach().float().reshape(()) for i, k in slots]).cpu().tolist()
        for (i, k), v in zip(slots, values):
            out[i][1][k] = v
    return out


class MetricsLog:
    """Rank 0's metric sink for one worker-group attempt."""

    def __init__(self, run_uri: str, total_steps: int, log_every: int = 10, resume_step: int = 0,
                 offset: dict | None = None):
        self.run_uri = run_uri
        self.loc = resolve(run_uri)
        self.total_steps, self.log_every = total_steps, log_every
        self.s3 = self.loc.is_s3
        if self.s3:
            self.spool = Path(tempfile.mkdtemp(prefix="alip-metrics-"))
            self.jsonl = self.spool / JSONL
            self.jsonl.write_text("")
            self._drop_segments_after(resume_step)
            self.tb_dir = self.spool / TENSORBOARD
        else:
            run_dir = Path(self.loc.path)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = run_dir / JSONL
            self._truncate_local(resume_step, (offset or {}).get("bytes"))
            self.tb_dir = run_dir / TENSORBOARD
        self._first_uncommitted = resume_step + 1
        self._pending: list[tuple[int, dict]] = []
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1)
        except Exception as e:  # TensorBoard is optional at run time; JSONL is the record
            print(f"[pretrain] TensorBoard disabled: {e}")
        self._t0, self._samples = time.perf_counter(), 0

    # ------------------------------------------------------------------ resume

    def _truncate_local(self, resume_step: int, size: int | None) -> None:
        if not self.jsonl.exists() or resume_step == 0:
            self.jsonl.write_text("")
            return
        if size is not None and size <= self.jsonl.stat().st_size:
            with self.jsonl.open("r+b") as f:
                f.truncate(size)
            return
        # No offset (a checkpoint of an older version): keep the records up to the step.
        keep = [x for x in self.jsonl.read_text().splitlines() if x and json.loads(x)["step"] <= resume_step]
        self.jsonl.write_text("".join(x + "\n" for x in keep))

    def _drop_segments_after(self, resume_step: int) -> None:
        seg = self.loc.child(SEGMENTS)
        import pyarrow.fs as pafs

        infos = self.loc.fs.get_file_info(pafs.FileSelector(seg.path, allow_not_found=True))
        for info in infos:
            last = _segment_last(info.base_name)
            if resume_step == 0 or (last is not None and last > resume_step):
                self.loc.fs.delete_file(info.path)

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: dict, samples: int) -> None:
        """Queue a step's metrics (device tensors are fine); written every log_every steps."""
        self._samples += samples
        self._pending.append((step, metrics))
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        elapsed = time.perf_counter() - self._t0
        rate = round(self._samples / max(elapsed, 1e-9), 2)
        records = []
        for step, m in host_records(self._pending):
            records.append({"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()},
                            "samples_per_s": rate})
        self._pending.clear()
        with self.jsonl.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        if self._tb is not None:
            for r in records:
                for k, v in r.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, r["step"])
        self._progress(records[-1])

    def _progress(self, record: dict) -> None:
        step = record["step"]
        pct = 100.0 * step / self.total_steps
        parts = [f"[pretrain] step {step}/{self.total_steps} ({pct:.0f}%)", f"loss {record.get('loss', float('nan')):.4f}"]
        for key, label in (("loss_raw", "raw"), ("loss_caption", "cap"), ("infonce_raw", "nce_raw"),
                           ("infonce_caption", "nce_cap"), ("mean_sample_weight", "W_s"),
                           ("mean_raw_pair_weight", "W_t"), ("mean_caption_pair_weight", "W_c"),
                           ("fraction_caption_over_raw", "W_c>W_t"), ("logit_scale", "scale"), ("lr", "lr")):
            if isinstance(record.get(key), (int, float)):
                parts.append(f"{label} {record[key]:.3g}")
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
        print(" | ".join(parts), flush=True)

    def commit(self, step: int) -> dict:
        """Make everything up to `step` durable in the run's storage; returns the offset that the
        checkpoint of `step` stores."""
        self.flush()
        if self._tb is not None:
            self._tb.flush()
        if not self.s3:
            return {"bytes": self.jsonl.stat().st_size, "step": step}
        text = self.jsonl.read_text()
        if text:
            seg = self.loc.child(SEGMENTS).child(f"{self._first_uncommitted:010d}-{step:010d}.jsonl")
            with self.loc.fs.open_output_stream(seg.path) as out:
                out.write(text.encode("utf-8"))
            self.jsonl.write_text("")
        self._first_uncommitted = step + 1
        if self.tb_dir.exists():
            import pyarrow.fs as pafs

            pafs.copy_files(str(self.tb_dir), self.loc.child(TENSORBOARD).path,
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.loc.fs)
        return {"step": step}

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
        if self.s3:
            shutil.rmtree(self.spool, ignore_errors=True)


def _segment_last(name: str) -> int | None:
    stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else None
    if not stem or "-" not in stem:
        return None
    try:
        return int(stem.split("-")[1])
    except ValueError:
        return None


def read_history(run_uri: str, upto_step: int | None = None) -> list[dict]:
    """The run's metric records from its storage (local JSONL or the s3 segments), in step order,
    up to `upto_step` (the final checkpoint's step)."""
    loc = resolve(run_uri)
    lines: list[str] = []
    if loc.is_s3:
        import pyarrow.fs as pafs

        infos = loc.fs.get_file_info(pafs.FileSelector(loc.child(SEGMENTS).path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.base_name):
            with loc.fs.open_input_stream(info.path) as f:
                lines += f.read().decode("utf-8").splitlines()
    else:
        path = Path(loc.path) / JSONL
        if path.exists():
            lines = path.read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    if upto_step is not None:
        records = [r for r in records if r["step"] <= upto_step]
    return records


def plot_history(history: list[dict], out_png: str | os.PathLike, title: str = "") -> Path:
    """Gate-weighted losses, unweighted InfoNCE per path, gate means, momentum similarities and
    the W_c > W_t fraction over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.4))
    steps = [r["step"] for r in history]
    for ax, (name, keys) in zip(axes, PLOTTED):
        for k in keys:
            ys = [r.get(k) for r in history]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], label=k, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
