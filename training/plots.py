"""Pictures of a run: the loss curve (``loss.png``), rendered without a display."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it); short
    curves get a lighter smoothing so the line does not lag behind them."""
    if weight is None:
        weight = 0.9 if len(values) >= 100 else 0.6
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def render_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_history(
    valid_records: Sequence[dict[str, Any]], train_losses: Sequence[tuple[int, float]]
) -> bytes:
    """Training loss per iteration (raw and smoothed) and validation perplexity per epoch."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_ppl = fig.subplots(1, 2)
    if train_losses:
        its, losses = zip(*train_losses, strict=True)
        ax_loss.plot(its, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        ax_loss.plot(its, smooth(losses), color="tab:blue", label="smoothed")
        ax_loss.legend()
    ax_loss.set(title="Training loss", xlabel="iteration", ylabel="cross-entropy (nats/word)")
    ax_loss.grid(alpha=0.3)
    points = [(r["epoch"], r["valid_ppl"]) for r in valid_records if r.get("valid_ppl")]
    if points:
        epochs, ppls = zip(*points, strict=True)
        ax_ppl.plot(epochs, ppls, marker="o", color="tab:orange")
        best = min(ppls)
        ax_ppl.axhline(best, color="gray", linestyle=":", label=f"best {best:.4g}")
        ax_ppl.legend()
        if max(ppls) / max(best, 1e-9) > 20:
            ax_ppl.set_yscale("log")
    ax_ppl.set(title="Validation perplexity", xlabel="epoch", ylabel="perplexity")
    ax_ppl.grid(alpha=0.3)
    bits = [(r["epoch"], r["valid_bpc"]) for r in valid_records if r.get("valid_bpc")]
    if bits:  # the figure that compares any two models, whatever their tokens
        ax_bpc = ax_ppl.twinx()
        ax_bpc.plot(*zip(*bits, strict=True), marker="s", color="tab:green", label="bits/char")
        ax_bpc.set_ylabel("bits per character", color="tab:green")
        ax_bpc.legend(loc="upper center")
    return render_png(fig)
