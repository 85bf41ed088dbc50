"""Plot decode tok/s against batch size, ours and mlx-lm, from `engine_bench.py --out` files.

    python benchmarks/plot_decode.py results-gpu.json [more.json ...] --out decode.png

One panel per model; one colour per weight format (and per file when several are given); our
engine solid, mlx-lm dashed. Needs matplotlib, which is not a dependency of this project:
`pip install matplotlib`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="JSON files written by engine_bench.py --out")
    ap.add_argument("--out", type=Path, default=Path("decode.png"), help="PNG to write (default %(default)s)")
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise SystemExit("plot_decode.py needs matplotlib (not a project dependency): pip install matplotlib")

    # (model) -> list of (label, batches, ours tok/s, mlx-lm tok/s or None)
    series: dict[tuple[str, str, str, str], list[dict]] = {}  # (model, weights, device, file) -> rows
    for path in args.results:
        result = json.loads(path.read_text())
        device = result["meta"]["device"]
        for row in result["rows"]:
            if row["kind"] == "decode":
                series.setdefault((row["model"], row["weights"], device, path.stem), []).append(row)
    # Name the file only where one model, format and device comes from several files.
    seen: dict[tuple[str, str, str], int] = {}
    for model, weights, device, _ in series:
        seen[(model, weights, device)] = seen.get((model, weights, device), 0) + 1
    panels: dict[str, list] = {}
    for (model, weights, device, stem), rows in series.items():
        rows.sort(key=lambda r: r["batch"])
        mlx = [r["mlx-lm"]["tok_s"] for r in rows] if all("mlx-lm" in r for r in rows) else None
        label = f"{weights}, {device}" + (f", {stem}" if seen[(model, weights, device)] > 1 else "")
        panels.setdefault(model, []).append(
            (label, [r["batch"] for r in rows], [r["ours"]["tok_s"] for r in rows], mlx)
        )
    if not panels:
        raise SystemExit("no decode rows in " + ", ".join(map(str, args.results)))

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, lines) in zip(axes[0], sorted(panels.items())):
        for i, (label, batches, ours, mlx) in enumerate(lines):
            colour = f"C{i}"
            ax.plot(batches, ours, "-o", color=colour, label=f"ours {label}")
            if mlx is not None:
                ax.plot(batches, mlx, "--s", color=colour, label=f"mlx-lm {label}")
        ax.set_xscale("log", base=2)
        ticks = sorted({b for _, batches, _, _ in lines for b in batches})
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tok/s")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("decode throughput: vllm-metal-rs engine (solid) vs mlx-lm (dashed)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
