"""What a search found, without Ray: the quality-respecting objective, the Pareto front of P@1 against
faithfulness, the results table (CSV + Markdown) and the Pareto plot (PNG)."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

INFEASIBLE_PENALTY = 1.0  # P@1 lies in [0, 1]: every trial that meets the constraints outranks every one that does not


@dataclass(frozen=True)
class Objective:
    """Validation P@1 among trials that meet the quality constraints: `value = p_at_1` when every constraint
    holds, `p_at_1 - 1` otherwise, so ASHA and the final choice rank any trial with well-formed captions above
    any without. A constraint whose metric the dataset does not measure (faithfulness off the world) is not
    applied, and `unmeasured` says so."""

    min_wellformed: float | None = 0.95
    min_faithful: float | None = None

    def constraints(self) -> dict[str, float]:
        return {k: v for k, v in (("wellformed", self.min_wellformed), ("faithful", self.min_faithful))
                if v is not None}

    def unmeasured(self, metrics: dict) -> list[str]:
        return [k for k in self.constraints() if not _number(metrics.get(k))]

    def feasible(self, metrics: dict) -> bool:
        return all(metrics[k] >= v for k, v in self.constraints().items() if _number(metrics.get(k)))

    def value(self, metrics: dict) -> float:
        return float(metrics["p_at_1"]) - (0.0 if self.feasible(metrics) else INFEASIBLE_PENALTY)

    def describe(self) -> str:
        cons = " and ".join(f"{k} >= {v:g}" for k, v in self.constraints().items())
        return f"validation P@1 among trials with {cons}" if cons else "validation P@1"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates maximised; ties kept)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((a >= x and b >= y) and (a > x or b > y) for j, (a, b) in enumerate(points) if j != i):
            front.append(i)
    return front


def mark_pareto(rows: list[dict], x: str = "faithful", y: str = "p_at_1") -> None:
    """Set each row's `pareto` (on the front of `y` against `x`); rows without both metrics are off it."""
    measured = [i for i, r in enumerate(rows) if _number(r.get(x)) and _number(r.get(y))]
    front = {measured[k] for k in pareto_front([(rows[i][x], rows[i][y]) for i in measured])}
    for i, r in enumerate(rows):
        r["pareto"] = i in front


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], columns: list[str], csv_path: Path, md_path: Path) -> str:
    """Write the rows as CSV and as a Markdown table; returns the Markdown."""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    Path(md_path).write_text(md)
    return md


def plot_pareto(rows: list[dict], path: Path, title: str, x: str = "faithful", y: str = "p_at_1") -> bool:
    """P@1 against faithfulness of every trial (feasible filled, infeasible hollow, early-stopped small), the
    Pareto front as a step line and the best trial starred. False (nothing drawn) when no row has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _number(r.get(x)) and _number(r.get(y))]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for r in pts:
        ax.scatter(r[x], r[y], s=70 if r.get("status") == "completed" else 30,
                   facecolors="tab:blue" if r.get("feasible") else "none", edgecolors="tab:blue", zorder=3)
        ax.annotate(str(r.get("trial", "")), (r[x], r[y]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r[x])
    if front:
        ax.step([r[x] for r in front], [r[y] for r in front], where="post", color="tab:orange", label="Pareto front")
    best = [r for r in pts if r.get("best")]
    if best:
        ax.scatter(best[0][x], best[0][y], marker="*", s=260, color="tab:red", zorder=4, label="chosen")
    ax.scatter([], [], facecolors="tab:blue", edgecolors="tab:blue", label="meets the quality constraints")
    ax.scatter([], [], facecolors="none", edgecolors="tab:blue", label="fails them")
    ax.set_xlabel(f"validation {x}")
    ax.set_ylabel(f"validation {y.replace('p_at_1', 'P@1')}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
