"""The pictures of the comparison reports (matplotlib, drawn off-screen)."""
from __future__ import annotations

from pathlib import Path

from fastlm.errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the reports draw PNGs with matplotlib: pip install matplotlib (or fastlm[dev])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_axis(ax) -> None:
    """A log-scale y axis labelled in plain numbers at 1, 2 and 5 per decade: over a narrow range
    (perplexities from 150 to 400, say) matplotlib's default labels only the powers of ten, often
    one or two of them."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def curves(path: Path, panels: list[dict], title: str) -> Path:
    """Side-by-side line charts. Each panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "log": bool}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        if panel.get("log"):
            log_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def unrolled_graph(path: Path, seq_len: int, chunks: int, nodes_with_detach: int, nodes_without: int) -> Path:
    """The unrolled LSTM over `chunks` windows of `seq_len` steps, with the detach cut marked."""
    plt = _pyplot()
    steps = seq_len * chunks
    fig, ax = plt.subplots(figsize=(2.0 * steps + 1.5, 4.6))
    box = dict(boxstyle="round,pad=0.35", linewidth=1.2)
    for t in range(steps):
        x = 1.6 * t
        ax.text(x, 0, f"$x_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e8f0fe"})
        ax.text(x, 1.5, f"$h_{{{t}}}, c_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#fff4d6"})
        ax.text(x, 3.0, f"$\\ell_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e6f4ea"})
        ax.annotate("", (x, 1.2), (x, 0.3), arrowprops=dict(arrowstyle="->"))
        ax.annotate("", (x, 2.7), (x, 1.8), arrowprops=dict(arrowstyle="->"))
        if t + 1 < steps:
            crossing = (t + 1) % seq_len == 0
            ax.annotate("", (x + 1.6 - 0.55, 1.5), (x + 0.55, 1.5),
                        arrowprops=dict(arrowstyle="->", color="black", linestyle="--" if crossing else "-"))
            if crossing:
                cut = x + 0.8
                ax.plot([cut, cut], [-0.5, 3.5], color="crimson", linestyle="--", linewidth=2)
                ax.text(cut, 3.75, "detach(): the state crosses,\ngradients stop here", color="crimson",
                        ha="center", va="bottom", fontsize=9)
    for k in range(chunks):
        left, right = 1.6 * k * seq_len - 0.5, 1.6 * ((k + 1) * seq_len - 1) + 0.5
        ax.text((left + right) / 2, -0.85, f"window {k + 1}: loss $L_{k + 1} = \\sum \\ell_t$, one optimizer step",
                ha="center", fontsize=9)
    ax.set_xlim(-0.9, 1.6 * (steps - 1) + 0.9)
    ax.set_ylim(-1.2, 4.6)
    ax.axis("off")
    ax.set_title(f"Unrolled LSTM, seq_len {seq_len}, {chunks} windows. Autograd nodes a backward from "
                 f"window {chunks}'s loss visits: {nodes_with_detach} with detach, {nodes_without} without",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
