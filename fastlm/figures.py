"""The pictures of the comparison reports (matplotlib, drawn off-screen)."""
from __future__ import annotations

from pathlib import Path

from fastlm.errors import UsageError
from fastlm.files import write_output

COMMON_FORMATS = ("png", "pdf", "svg")  # named first when a format is refused


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the reports draw PNGs with matplotlib: pip install matplotlib (or fastlm[dev])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_format(path: Path, flag: str = "--out") -> str:
    """The format `path` is drawn in: its suffix (PNG without one), refused unless matplotlib writes it."""
    pyplot()
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
    fmt, plt = image_format(path), pyplot()
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


FORWARD = dict(arrowstyle="->", color="black", linewidth=1.1)
BACKWARD = dict(arrowstyle="->", color="crimson", linestyle="--", linewidth=1.4)
STEP_X = 1.6  # horizontal distance between two time steps' cells


def unrolled_graph(path: Path, seq_len: int, chunks: int, nodes_with_detach: int, nodes_without: int) -> list[str]:
    """The unrolled LSTM over `chunks` windows of `seq_len` steps, twice: with detach above, without
    below. Each shows the forward pass (solid black: the initial state, the weights each window ran
    with, each window's loss, the mean over its steps) and the backward from the last window's loss
    (dashed red), which stops at the detach cut above and runs back to h_0 below.
    Returns the texts drawn, so that a test can read what the picture says."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    steps = seq_len * chunks
    fig, axes = plt.subplots(2, 1, figsize=(2.0 * steps + 3.0, 11.5))
    last = f"$L_{{{chunks}}}$"
    captions = [f"With detach: the state crosses the window edge, the gradient of {last} stops there. "
                f"A backward from {last} visits {nodes_with_detach} autograd nodes.",
                f"Without detach: the gradient of {last} runs back through every window to $h_0, c_0$. "
                f"A backward from {last} visits {nodes_without} autograd nodes."]
    for ax, detach, caption in zip(axes, (True, False), captions):
        _forward_pass(ax, seq_len, chunks, detach)
        _backward_pass(ax, seq_len, chunks, detach)
        ax.set_title(caption, fontsize=11, loc="left")
        ax.set_xlim(-2.7, STEP_X * (steps - 1) + 0.9)
        ax.set_ylim(-2.4, 5.9)
        ax.axis("off")
    legend = [Line2D([], [], **{k: v for k, v in FORWARD.items() if k != "arrowstyle"}, label="forward: values"),
              Line2D([], [], **{k: v for k, v in BACKWARD.items() if k != "arrowstyle"},
                     label=f"backward: the gradient of {last}")]
    axes[0].legend(handles=legend, loc="upper left", fontsize=9)
    note = ("$\\ell_t$: step t's cross-entropy, averaged over the batch rows, so $L_k$ is what F.cross_entropy "
            "returns for window k. W: the LSTM's weights, shared by every step; without detach, "
            f"{last}'s backward\nruns through window 1's cells, which used $W^{{(1)}}$: the optimizer has "
            "overwritten it since, so a retained graph must keep a copy of it.")
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=9)
    title = (f"Unrolled LSTM, seq_len T = {seq_len}, {chunks} windows: forward solid, backward from window "
             f"{chunks}'s loss dashed")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [text.get_text() for ax in axes for text in ax.texts if text.get_text()] + captions + [
        handle.get_label() for handle in legend] + [note, title]


def _forward_pass(ax, seq_len: int, chunks: int, detach: bool) -> None:
    """Cells, inputs, step losses and the state arrows; the window edges, marked as a cut with detach."""
    steps = seq_len * chunks
    box = dict(boxstyle="round,pad=0.35", linewidth=1.2)
    ax.text(-1.8, 1.5, "$h_0, c_0$\n(initial state)", ha="center", va="center", bbox={**box, "facecolor": "#f1f1f1"})
    ax.annotate("", (-0.55, 1.62), (-1.1, 1.62), arrowprops=FORWARD)
    for t in range(1, steps + 1):
        x, side = STEP_X * (t - 1), _input_side(t, seq_len)
        ax.text(x + 0.3 * side, 0, f"$x_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e8f0fe"})
        ax.text(x, 1.5, f"$h_{{{t}}}, c_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#fff4d6"})
        ax.text(x, 3.0, f"$\\ell_{{{t}}}$", ha="center", va="center", bbox={**box, "facecolor": "#e6f4ea"})
        ax.annotate("", (x + 0.15 * side, 1.2), (x + 0.3 * side, 0.3), arrowprops=FORWARD)
        ax.annotate("", (x - 0.12, 2.7), (x - 0.12, 1.8), arrowprops=FORWARD)
        if t < steps:
            ax.annotate("", (x + STEP_X - 0.55, 1.62), (x + 0.55, 1.62), arrowprops=FORWARD)
        if t < steps and t % seq_len == 0:
            _window_edge(ax, x + STEP_X / 2, detach)
    for k in range(1, chunks + 1):
        _window_loss_and_weights(ax, k, seq_len, box)


def _window_edge(ax, x: float, detach: bool) -> None:
    if detach:
        ax.plot([x, x], [-2.2, 4.9], color="crimson", linestyle="-", linewidth=2.5)
        ax.text(x, 5.0, "detach(): the state crosses,\nthe gradient stops here", color="crimson", ha="center",
                va="bottom", fontsize=9)
    else:
        ax.plot([x, x], [-2.2, 4.9], color="grey", linestyle=":", linewidth=1.5)
        ax.text(x, 5.0, "window edge: no cut,\nthe gradient crosses", color="grey", ha="center", va="bottom",
                fontsize=9)


def _backward_pass(ax, seq_len: int, chunks: int, detach: bool) -> None:
    """The last window's loss back-propagated: into its steps' losses and cells, back along the state
    to the first cell it reaches, and into the weights of every window it passes through."""
    steps = seq_len * chunks
    first = steps - seq_len + 1 if detach else 1
    loss_x = STEP_X * (steps - seq_len + (seq_len - 1) / 2)
    for t in range(steps - seq_len + 1, steps + 1):
        x = STEP_X * (t - 1)
        ax.annotate("", (x + 0.2, 3.3), (loss_x + 0.2, 3.9), arrowprops=BACKWARD)
        ax.annotate("", (x + 0.12, 1.8), (x + 0.12, 2.7), arrowprops=BACKWARD)
    for t in range(steps, first, -1):
        x = STEP_X * (t - 1)
        ax.annotate("", (x - STEP_X + 0.55, 1.38), (x - 0.55, 1.38), arrowprops=BACKWARD)
    first_x = STEP_X * (first - 1)
    if detach:
        cut = first_x - STEP_X / 2
        ax.annotate("", (cut + 0.05, 1.38), (first_x - 0.55, 1.38), arrowprops=BACKWARD)
        ax.text(cut, 1.38, "✕", color="crimson", ha="center", va="center", fontsize=22, fontweight="bold")
    else:
        ax.annotate("", (-1.1, 1.38), (-0.55, 1.38), arrowprops=BACKWARD)
    for k in range(1 + (chunks - 1) * detach, chunks + 1):
        middle = STEP_X * ((k - 1) * seq_len + (seq_len - 1) / 2)
        ax.annotate("", (middle + 0.7, -1.22), (middle + 0.5, 1.2), arrowprops=BACKWARD)


def _window_loss_and_weights(ax, k: int, seq_len: int, box: dict) -> None:
    """Window k's loss, the mean of its steps' losses, and the weights it ran with, W as the
    optimizer left it after k - 1 updates."""
    first = (k - 1) * seq_len + 1
    xs = [STEP_X * (t - 1) for t in range(first, first + seq_len)]
    middle = (xs[0] + xs[-1]) / 2
    terms = " + ".join(f"\\ell_{{{t}}}" for t in range(first, first + seq_len))
    ax.text(middle, 4.2, f"$L_{{{k}}} = \\frac{{1}}{{{seq_len}}}({terms})$", ha="center", va="center",
            bbox={**box, "facecolor": "#d7f0dd"})
    updates = "before any update" if k == 1 else f"after {k - 1} update{'s' * (k > 2)}"
    ax.text(middle, -1.5, f"$W^{{({k})}}$: W {updates}", ha="center", va="center",
            bbox={**box, "facecolor": "#f3e5f5"})
    for t, x in enumerate(xs, first):
        ax.annotate("", (middle - 0.2, 3.9), (x - 0.2, 3.3), arrowprops=FORWARD)
        ax.annotate("", (x - 0.15 * _input_side(t, seq_len), 1.2), (middle, -1.2),
                    arrowprops={**FORWARD, "color": "#555555", "linewidth": 0.8})


def _input_side(t: int, seq_len: int) -> int:
    """-1 (left) or 1: x_t's arrow enters its cell on the side away from the window's middle, so
    that it does not cross the arrow from the window's weights."""
    return -1 if (t - 1) % seq_len < seq_len / 2 else 1
