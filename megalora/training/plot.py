"""The loss-curve PNG written at the end of a run (matplotlib, headless)."""

from __future__ import annotations

from typing import Optional


def plot_losses(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]],
                base_eval: Optional[float] = None, merged_eval: Optional[float] = None,
                title: str = "megalora LoRA fine-tune") -> Optional[str]:
    """Writes train loss per step, eval loss points and the base model's eval loss as a line.

    Returns:
        ``path``, or ``None`` when matplotlib is not installed (``pip install
        megalora[plot]``); the run does not fail for a missing plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a cluster node
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss (answer tokens)", color="tab:blue", lw=1.4)
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", label="eval loss", color="tab:orange", lw=1.4)
    if base_eval is not None:
        ax.axhline(base_eval, ls="--", color="tab:gray", label=f"base model eval ({base_eval:.3f})")
    if merged_eval is not None and evals:
        ax.plot([evals[-1][0]], [merged_eval], "x", ms=10, color="tab:red",
                label=f"merged model eval ({merged_eval:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
