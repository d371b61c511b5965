"""Draws docs/images/masked_forward.png from the library's own task mask: who reads whom in one masked layer.

python docs/figures.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from memory_peft.tuner.layout import task_mask_rows, with_base_columns  # noqa: E402

PATCHES, TASKS, M = 6, 3, 2  # a small picture: 6 patches, 3 merged tasks of 2 memory rows each


def main(out: Path = Path(__file__).parent / "images" / "masked_forward.png") -> None:
    rows = task_mask_rows(TASKS, [M] * TASKS, [[t] for t in range(TASKS)], torch.float32, "cpu")
    allowed = with_base_columns(rows, 1 + PATCHES, base_rows=True) == 0  # (n + T, n + T + M*T)
    names = ["c0", *(f"p{i + 1}" for i in range(PATCHES)), *(f"c{t + 1}" for t in range(TASKS))]
    columns = names + [f"E{t + 1}.{j + 1}" for t in range(TASKS) for j in range(M)]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.imshow(allowed.numpy(), cmap="Blues", vmin=-0.3, vmax=1.2)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("keys / values: base tokens | task class tokens | task memories")
    ax.set_ylabel("queries (rows kept after the layer)")
    ax.set_title("One masked layer, 3 merged tasks: blue = may attend", fontsize=10)
    for edge in (1 + PATCHES - 0.5, 1 + PATCHES + TASKS - 0.5):
        ax.axvline(edge, color="black", linewidth=0.8)
    ax.axhline(1 + PATCHES - 0.5, color="black", linewidth=0.8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
