"""The layouts chart: images/s per case and layout, one panel per model, each case's limit as a line."""
from __future__ import annotations


def plot_layouts(results: dict, path: str) -> None:
    """Write a PNG: grouped bars (layouts, and the peer if measured) per case; the limit the case is
    divided by as a solid line over its group, the other limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    width = 0.8 / len(layouts)
    for ax, model in zip(axes[0], models):
        cases = list(dict.fromkeys((r["case"], r["title"]) for r in rows if r["model"] == model))
        for j, layout in enumerate(layouts):
            values = [next((r["images_per_s"] for r in rows if r["model"] == model and r["case"] == case
                            and r["layout"] == layout), 0.0) for case, _ in cases]
            ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(cases))], values, width, label=layout)
        for i, (case, _) in enumerate(cases):
            limit = next(r["limit"] for r in rows if r["model"] == model and r["case"] == case)
            ax.hlines(limit, i - 0.45, i + 0.45, colors="black", linewidth=2)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([title.replace(", ", "\n", 1) for _, title in cases], fontsize=8)
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} ({results['cores']} cores, load {results['load_before']:.2f})")
    axes[0][0].legend(fontsize=8, title="black line: the case's limit", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
