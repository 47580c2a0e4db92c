"""The pictures of the comparison reports (matplotlib, drawn off-screen)."""
from __future__ import annotations

from pathlib import Path

from fastlm.errors import UsageError
from fastlm.files import write_output

COMMON_FORMATS = ("png", "pdf", "svg")  # named first when a format is refused


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the reports draw PNGs with matplotlib: pip install matplotlib (or fastlm[dev])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_format(path: Path, flag: str = "--out") -> str:
    """The format `path` is drawn in: its suffix (PNG without one), refused unless matplotlib writes it."""
    _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(path).suffix[1:].lower() or "png"
    formats = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in formats:
        known = [*COMMON_FORMATS, *sorted(set(formats) - set(COMMON_FORMATS))]
        raise UsageError(f"cannot draw {flag} {path} as {fmt}: matplotlib writes {', '.join(known)}; name the file "
                         f"with one of those suffixes, e.g. {Path(path).with_suffix('.png')}")
    return fmt


def log_axis(ax) -> None:
    """A log-scale y axis (call it once the data is drawn) labelled in plain numbers at 1, 2 and 5 per
    decade over a narrow range (perplexities from 150 to 400, say: matplotlib's default labels only
    the powers of ten, often one or two of them); over more than two decades, at the powers of ten."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low > 100:
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation())
    else:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.yaxis.set_minor_formatter(NullFormatter())


def curves(path: Path, panels: list[dict], title: str) -> Path:
    """Side-by-side line charts. Each panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "log": bool};
    a series (xs, ys, lows, highs) also shades the band from lows to highs. Written by `write_output`'s rule,
    in the format of the path's suffix (`image_format`), to exactly that path."""
    fmt, plt = image_format(path), _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys, *band) in panel["series"].items():
            xs, ys = list(xs), list(ys)
            line, = ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            if band:
                ax.fill_between(xs, *band, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        if panel.get("log"):
            log_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        write_output(path, lambda file: fig.savefig(file, format=fmt, dpi=120), example="curves.png")
    finally:
        plt.close(fig)
    return path


def unrolled_graph(path: Path, seq_len: int, chunks: int, nodes_with_detach: int, nodes_without: int) -> list[str]:
    """The unrolled LSTM over `chunks` windows of `seq_len` steps: the initial state, the weights
    each window ran with, each window's loss (the mean over its steps) and the detach cut.
    Returns the texts drawn, so that a test can read what the picture says."""
    plt = _pyplot()
    steps = seq_len * chunks
    fig, ax = plt.subplots(figsize=(2.0 * steps + 3.0, 6.4))
    box = dict(boxstyle="round,pad=0.35", linewidth=1.2)
    arrow = dict(arrowstyle="->")
    ax.text(-1.8, 1.5, "$h_0, c_0$\n(initial state)", ha="center", va="center", bbox={**box, "facecolor": "#f1f1f1"})
    ax.annotate("", (-0.55, 1.5), (-1.1, 1.5), arrowprops=arrow)
    for t in range(1, steps + 1):
        x, side = 1.6 * (t - 1), _input_side(t, seq_len)
        ax.text(x + 0.3 * side, 0, f"$x_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e8f0fe"})
        ax.text(x, 1.5, f"$h_{{{t}}}, c_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#fff4d6"})
        ax.text(x, 3.0, f"$\\ell_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e6f4ea"})
        ax.annotate("", (x + 0.15 * side, 1.2), (x + 0.3 * side, 0.3), arrowprops=arrow)
        ax.annotate("", (x, 2.7), (x, 1.8), arrowprops=arrow)
        if t < steps:
            crossing = t % seq_len == 0
            ax.annotate("", (x + 1.6 - 0.55, 1.5), (x + 0.55, 1.5),
                        arrowprops=dict(arrowstyle="->", color="black", linestyle="--" if crossing else "-"))
            if crossing:
                cut = x + 0.8
                ax.plot([cut, cut], [-2.4, 4.9], color="crimson", linestyle="--", linewidth=2)
                ax.text(cut, 5.0, "detach(): the state crosses,\ngradients stop here", color="crimson",
                        ha="center", va="bottom", fontsize=9)
    for k in range(1, chunks + 1):
        _window_loss_and_weights(ax, k, seq_len, box)
    ax.text(1.6 * (steps - 1) / 2, -3.0, "$\\ell_t$: step t's cross-entropy, averaged over the batch rows, so "
            "$L_k$ is what F.cross_entropy returns for window k. W: the LSTM's weights, shared by every step; "
            "without detach, $L_2$'s backward\nruns through window 1's cells, which used $W^{(1)}$: the "
            "optimizer has overwritten it since, so a retained graph must keep a copy of it.",
            ha="center", va="top", fontsize=9)
    ax.set_xlim(-2.7, 1.6 * (steps - 1) + 0.9)
    ax.set_ylim(-3.8, 5.9)
    ax.axis("off")
    title = (f"Unrolled LSTM, seq_len T = {seq_len}, {chunks} windows. Autograd nodes a backward from window "
             f"{chunks}'s loss visits: {nodes_with_detach} with detach, {nodes_without} without")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [text.get_text() for text in ax.texts if text.get_text()] + [title]


def _window_loss_and_weights(ax, k: int, seq_len: int, box: dict) -> None:
    """Window k's loss, the mean of its steps' losses, and the weights it ran with, W as the
    optimizer left it after k - 1 updates."""
    first = (k - 1) * seq_len + 1
    xs = [1.6 * (t - 1) for t in range(first, first + seq_len)]
    middle = (xs[0] + xs[-1]) / 2
    terms = " + ".join(f"\\ell_{{{t}}}" for t in range(first, first + seq_len))
    ax.text(middle, 4.2, f"$L_{{{k}}} = \\frac{{1}}{{{seq_len}}}({terms})$", ha="center", va="center",
            bbox={**box, "facecolor": "#d7f0dd"})
    updates = "before any update" if k == 1 else f"after {k - 1} update{'s' * (k > 2)}"
    ax.text(middle, -1.7, f"$W^{{({k})}}$: W {updates}", ha="center", va="center",
            bbox={**box, "facecolor": "#f3e5f5"})
    for t, x in enumerate(xs, first):
        ax.annotate("", (middle, 3.9), (x, 3.3), arrowprops=dict(arrowstyle="->", color="#2e7d32"))
        ax.annotate("", (x - 0.15 * _input_side(t, seq_len), 1.2), (middle, -1.4),
                    arrowprops=dict(arrowstyle="->", color="#7b1fa2", alpha=0.7))


def _input_side(t: int, seq_len: int) -> int:
    """-1 (left) or 1: x_t's arrow enters its cell on the side away from the window's middle, so
    that it does not cross the arrow from the window's weights."""
    return -1 if (t - 1) % seq_len < seq_len / 2 else 1
