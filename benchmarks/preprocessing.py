"""Preprocessing throughput and agreement of transformers' two image-processor backends, side by side in one run.

transformers 5.x's ``AutoImageProcessor`` gives the torchvision backend (``ViTImageProcessor``) where torchvision is
installed and the PIL backend (``ViTImageProcessorPil``) otherwise, so the same training command preprocesses with
whichever the machine has. This measures both on the same images through ``memory_peft.data.image_transform`` (the
transform training and evaluation use): images per second per core count, and how far their pixels differ.

    python benchmarks/preprocessing.py                 # bundled CIFAR-10 and ViT-S/14; both backends if available
    python benchmarks/preprocessing.py --sizes 98 224 --images 512

Run it where torchvision is installed to see both rows; without it the torchvision row says it is absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.utils import is_torchvision_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_peft.assets import default_backbone, default_dataset, portable  # noqa: E402
from memory_peft.data import image_processor, image_transform, load_image_data  # noqa: E402

BACKENDS = ("pil", "torchvision")


def processor_for(backbone: str, backend: str, image_size: int):
    """The backbone's image processor with the named backend, or None where that backend is not installed."""
    if backend == "torchvision" and not is_torchvision_available():
        return None
    return image_processor(backbone, image_size, backend=backend)


def throughput(transform, batches: list[dict], repeats: int) -> float:
    """Images per second through ``transform`` over ``batches`` (median of ``repeats`` passes after one warm-up)."""
    transform(batches[0])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            transform(batch)
        seconds.append(time.perf_counter() - start)
    return sum(len(b["label"]) for b in batches) / statistics.median(seconds)


def main(argv: list[str] | None = None) -> dict:
    """Prints the tables; returns {(size, backend, threads): images/s, or None where the backend is absent} and, where
    both backends ran, {("difference", size): (max, mean)}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=default_backbone())
    parser.add_argument("--dataset", default=default_dataset("cifar10"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[98, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args(argv)

    data = load_image_data(args.dataset, train_size=args.images)
    rows = data.train[: args.images]
    images, labels = rows[data.image_column], rows[data.label_column]
    step = args.batch_size
    starts = range(0, len(images), step)
    batches = [{data.image_column: images[i : i + step], "label": labels[i : i + step]} for i in starts]
    print(
        f"# benchmarks/preprocessing.py: {portable(args.dataset)}, {args.images} images in batches of "
        f"{args.batch_size}, backbone {portable(args.backbone)}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print("\n| size | backend | processor | threads | images/s | augment (flip) images/s | vs pil |")
    print("|---|---|---|---|---|---|---|")
    agreement, facts = [], {}
    for size in args.sizes:
        processors = {backend: processor_for(args.backbone, backend, size) for backend in BACKENDS}
        for threads in sorted(set(args.threads)):
            torch.set_num_threads(threads)
            pil_rate = None
            for backend, processor in processors.items():
                if processor is None:
                    facts[size, backend, threads] = None
                    print(f"| {size} | {backend} | not installed | {threads} | — | — | — |")
                    continue
                plain = throughput(image_transform(processor, data.image_column, "label"), batches, args.repeats)
                flip = throughput(image_transform(processor, data.image_column, "label", True), batches, args.repeats)
                pil_rate = plain if backend == "pil" else pil_rate
                facts[size, backend, threads] = plain
                ratio = f"{plain / pil_rate:.2f}x" if pil_rate else "—"
                name = type(processor).__name__
                print(f"| {size} | {backend} | {name} | {threads} | {plain:.0f} | {flip:.0f} | {ratio} |")
        if all(processors.values()):
            pixels = {
                backend: torch.cat([image_transform(p, data.image_column, "label")(b)["pixel_values"] for b in batches])
                for backend, p in processors.items()
            }
            difference = (pixels["pil"] - pixels["torchvision"]).abs()
            spread = pixels["pil"].std().item()
            agreement.append((size, difference.max().item(), difference.mean().item(), spread))
            facts["difference", size] = agreement[-1][1:3]
    if agreement:
        print("\n| size | max abs pixel difference | mean abs difference | pixel std (pil) |")
        print("|---|---|---|---|")
        for size, largest, mean, spread in agreement:
            print(f"| {size} | {largest:.4f} | {mean:.5f} | {spread:.3f} |")
    return facts


if __name__ == "__main__":
    main()
