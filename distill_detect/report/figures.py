"""PNG versions of the report's figures (for papers and slides), drawn with matplotlib's Agg backend.

They draw the same document as the HTML page (``build.collect``), so the two never
disagree. Files: ``roc.png`` (linear and log-log), ``score_histograms.png``,
``token_probabilities.png`` and, with ablations, ``tpd_ablations.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = {"member": "#0072b2", "nonmember": "#d55e00", "unlabelled": "#999999"}
NAMES = {"member": "members", "nonmember": "non-members", "unlabelled": "unlabelled"}
PALETTE = ["#000000", "#e69f00", "#56b4e9", "#009e73", "#cc79a7", "#0072b2", "#d55e00", "#7f7f7f"]
DASHES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e6e8ec",
            "grid.linewidth": 0.8,
            "axes.edgecolor": "#9aa1ac",
            "legend.frameon": False,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
        }
    )
    return plt


def _styles(methods: list[dict]) -> dict:
    order = sorted((m["name"] for m in methods), key=lambda n: n != "tpd")
    return {
        n: {"color": PALETTE[i % len(PALETTE)], "ls": DASHES[(i // len(PALETTE)) % len(DASHES)], "lw": 2.4 if n == "tpd" else 1.5}
        for i, n in enumerate(order)
    }


def _names(doc: dict) -> dict:
    """Group names as the page gives them (an audit's groups are reference and benchmark questions)."""
    return {**NAMES, **(doc.get("group_names") or {})}


def _direction(m: dict) -> str:
    h = m.get("higher_is_member")
    return "higher = member" if h else "lower = member" if h is False else "direction unknown"


def roc_figure(doc: dict, path: Path) -> Path | None:
    methods = [m for m in doc["methods"] if m.get("roc")]
    if not methods:
        return None
    plt = _plt()
    styles = _styles(doc["methods"])
    meta = doc["meta"]
    n = max(meta.get("n_members") or 1, meta.get("n_nonmembers") or 1)
    lo = min(0.01, 10 ** math.floor(math.log10(0.5 / n)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    order = sorted(methods, key=lambda m: -((m.get("metrics") or {}).get("auc") or -1))
    for ax, log in zip(axes, (False, True)):
        for m in order:
            st = styles[m["name"]]
            f = [max(v, lo) if log else v for v in m["roc"]["fpr"]]
            t = [max(v, lo) if log else v for v in m["roc"]["tpr"]]
            auc = (m.get("metrics") or {}).get("auc")
            label = f"{m['name']} (AUC {auc:.3f})" if auc is not None else m["name"]
            ax.plot(f, t, color=st["color"], ls=st["ls"], lw=st["lw"], label=label)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, 1)
            ax.set_ylim(lo, 1)
            ax.plot([lo, 1], [lo, 1], color="#b8bec8", ls=":", lw=1)
            ax.axvline(0.01, color="#c8b8e8", lw=1)
            ax.set_title("log-log (zero rates drawn at the lower edge)", fontsize=10)
        else:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.plot([0, 1], [0, 1], color="#b8bec8", ls=":", lw=1)
            ax.set_title("linear", fontsize=10)
        ax.axvline(0.05, color="#c8b8e8", lw=1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(5, len(labels)), fontsize=8.5)
    fig.suptitle("ROC curves (members = positives)", fontsize=12)
    fig.savefig(path)
    plt.close(fig)
    return path


def histogram_figure(doc: dict, path: Path) -> Path | None:
    methods = [m for m in doc["methods"] if m.get("hist")]
    if not methods:
        return None
    plt = _plt()
    names = _names(doc)
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        h = m["hist"]
        edges = h["edges"]
        groups = list(h["counts"])
        width = (edges[1] - edges[0]) / (len(groups) + 0.4)
        for j, g in enumerate(groups):
            xs = [edges[b] + (j + 0.2) * width for b in range(len(edges) - 1)]
            ax.bar(xs, h["counts"][g], width=width, align="edge", color=COLORS[g], label=names[g])
        ax.set_title(f"{m['name']} ({_direction(m)})", fontsize=10)
        ax.set_ylabel("questions")
        ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8.5)
    vs = "benchmark vs reference questions" if doc.get("kind") == "audit" else "members vs non-members"
    fig.suptitle(f"Score distributions, {vs} (raw scores, each method's own sign)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def token_figure(doc: dict, path: Path) -> Path | None:
    th = doc.get("token_hist")
    if not th:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    edges = th["edges"]
    groups = list(th["fractions"])
    width = (edges[1] - edges[0]) / (len(groups) + 0.4)
    names = _names(doc)
    for j, g in enumerate(groups):
        xs = [edges[b] + (j + 0.2) * width for b in range(len(edges) - 1)]
        label = f"{names[g]} ({th['tokens'][g]} tokens, {th['questions'][g]} questions)"
        ax.bar(xs, th["fractions"][g], width=width, align="edge", color=COLORS[g], label=label)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the generated token")
    ax.set_ylabel("share of tokens")
    M = (doc.get("tokens") or {}).get("M")
    ax.set_title(f"Generated-token probabilities, first M = {M} tokens per question", fontsize=11)
    ax.legend(loc="upper left", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path


def ablation_figure(doc: dict, path: Path) -> Path | None:
    ab = doc.get("ablations")
    if not ab or not ab.get("sweeps"):
        return None
    plt = _plt()
    sweeps = [(k, v) for k, v in ab["sweeps"].items() if v]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4 * len(sweeps), 3.4), squeeze=False)
    titles = {"max_tokens": "token budget M", "tau": "threshold τ", "alpha": "exponent α"}
    lines = [
        ("auc", "AUC", "#000000", "-"),
        ("tpr_at_5pct_fpr", "TPR@5%FPR", "#009e73", "--"),
        ("tpr_at_1pct_fpr_strict", "TPR@1%FPR (strict)", "#cc79a7", ":"),
    ]
    for ax, (name, pts) in zip(axes.flat, sweeps):
        xs = [p["value"] for p in pts]
        band = [p for p in pts if p.get("auc_ci") and p["auc_ci"][0] is not None]
        if len(band) > 1:
            ax.fill_between(
                [p["value"] for p in band],
                [p["auc_ci"][0] for p in band],
                [p["auc_ci"][1] for p in band],
                color="#00000014",
                lw=0,
            )
        for key, label, color, ls in lines:
            ys = [p.get(key) for p in pts]
            ax.plot(xs, [math.nan if y is None else y for y in ys], color=color, ls=ls, marker="o", ms=3.5, lw=1.7, label=label)
        dv = (ab.get("defaults") or {}).get(name)
        if dv is not None:
            ax.axvline(dv, color="#c8b8e8", lw=1.5)
        if name == "max_tokens":
            ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(titles.get(name, name))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=len(labels), fontsize=8.5)
    title = "TPD ablations (one parameter varied, others at defaults; band: AUC 95% CI)"
    caveat = (ab.get("tpr_caveat") or {}).get("0.01")
    if caveat:
        title += f"\nTPR curves {caveat}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_figures(doc: dict, fig_dir) -> list[Path]:
    """Write every figure the document has data for; returns the paths written."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for fn, name in (
        (roc_figure, "roc.png"),
        (histogram_figure, "score_histograms.png"),
        (token_figure, "token_probabilities.png"),
        (ablation_figure, "tpd_ablations.png"),
    ):
        p = fn(doc, fig_dir / name)
        if p is not None:
            out.append(p)
    return out
