"""Per-step metrics: a progress line on the console, JSONL, TensorBoard, and the end-of-run plot."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

PLOTTED = (
    ("losses", ("loss", "loss_raw", "loss_caption")),
    ("gate means", ("mean_sample_weight", "mean_raw_pair_weight", "mean_caption_pair_weight")),
    ("momentum similarities", ("momentum_text_caption", "momentum_image_text", "momentum_image_caption")),
    ("W_c > W_t fraction", ("fraction_caption_over_raw",)),
)


class MetricsLog:
    """Rank 0's metric sink. `history` is also stored in every checkpoint, so a resumed run's
    JSONL and plot cover the whole run, not just the part after the last restart."""

    def __init__(self, log_dir: str | os.PathLike, total_steps: int, log_every: int = 10,
                 history: list[dict] | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.log_every = log_every
        self.history: list[dict] = list(history or [])
        self.jsonl = self.dir / "metrics.jsonl"
        # Rewrite from the (checkpointed) history: steps logged after the last checkpoint by a
        # worker that then died are dropped, so every step appears exactly once.
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=len(self.history) + 1)
        except Exception as e:  # TensorBoard is optional at run time; JSONL is the record
            print(f"[pretrain] TensorBoard disabled: {e}")
        self._t0, self._samples = time.perf_counter(), 0

    def log(self, step: int, metrics: dict, samples: int) -> None:
        self._samples += samples
        elapsed = time.perf_counter() - self._t0
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
                  "samples_per_s": round(self._samples / max(elapsed, 1e-9), 2)}
        self.history.append(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            pct = 100.0 * step / self.total_steps
            parts = [f"[pretrain] step {step}/{self.total_steps} ({pct:.0f}%)", f"loss {record['loss']:.4f}"]
            for key, label in (("loss_raw", "raw"), ("loss_caption", "cap"), ("mean_sample_weight", "W_s"),
                               ("mean_raw_pair_weight", "W_t"), ("mean_caption_pair_weight", "W_c"),
                               ("fraction_caption_over_raw", "W_c>W_t"), ("logit_scale", "scale"), ("lr", "lr")):
                if key in record:
                    parts.append(f"{label} {record[key]:.3g}")
            parts.append(f"{record['samples_per_s']:.1f} samples/s")
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_history(history: list[dict], out_png: str | os.PathLike, title: str = "") -> Path:
    """Losses, gate means, momentum similarities and the W_c > W_t fraction over steps."""
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
