"""Learning curves of a run as PNG files, from its metrics.jsonl records (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# (file stem, title, [(record key, label)], read from record["eval"]?)
CURVES = [
    ("reward", "reward per update", [("reward_mean", "mean reward"), ("clip_cos", "CLIP cosine (Gumbel)")], False),
    ("train_p_at_1", "train P@1 (in-batch retrieval of the sampled captions)", [("train_p_at_1", "train P@1")],
     False),
    ("kl", "KL to the supervised captioner", [("kl", "KL")], False),
    ("validation", "validation split", [("p_at_1", "P@1 among 100"), ("wellformed", "well-formed"),
                                        ("faithful", "faithful")], True),
]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    k = np.arange(1, len(values) + 1)
    lo = np.maximum(0, k - window)
    return (c[k] - c[lo]) / (k - lo)


def _series(records: list[dict], key: str, in_eval: bool) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records:
        fields = r.get("eval", {}) if in_eval else r
        v = fields.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return np.asarray(steps), np.asarray(values)


def learning_curves(records: list[dict], out: Path) -> list[dict]:
    """One PNG per curve that the records hold, in `out`; [{"file", "title"}] of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, keys, in_eval in CURVES:
        lines = [(label, *_series(records, key, in_eval)) for key, label in keys]
        lines = [line for line in lines if len(line[1])]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
        for label, steps, values in lines:
            if in_eval:
                ax.plot(steps, values, marker="o", label=label)
            else:
                window = len(values) // 20
                if window > 1:
                    ax.plot(steps, values, alpha=0.3, linewidth=0.8, label=f"{label} (per update)")
                    ax.plot(steps, smooth(values, window), linewidth=1.8, label=f"moving mean of {window} updates")
                else:
                    ax.plot(steps, values, linewidth=1.5, label=f"{label} (per update)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if in_eval:
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"curve_{stem}.png"
        fig.savefig(out / name)
        plt.close(fig)
        written.append({"file": name, "title": title})
    return written
