"""Masked training on cached base keys/values vs on the images: time per training step and disk per image.

    python benchmarks/cache.py                  # bundled ViT-S/14 + CIFAR-10, 98 px, batch 32, m=5, CPU

Both step kinds (forward, backward, SGD step of the memory-masked setting; the cached one includes reading the batch
from the memory-mapped cache) run once per round, rounds repeat, medians; rounds whose ratio lies farthest from the
median (foreign load) are dropped. Also: the one-off cost of building the cache, per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import steady_pairs  # noqa: E402

from memory_peft.assets import default_backbone, default_dataset  # noqa: E402
from memory_peft.cache import build_cache, cache_bytes_per_image  # noqa: E402
from memory_peft.data import image_processor, image_transform, load_image_data  # noqa: E402
from memory_peft.recipe import optimizer_steps, paper_recipe  # noqa: E402
from memory_peft.settings import apply_setting  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402
from memory_peft.training import make_accelerator  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    backbone = args.backbone or default_backbone()
    data = load_image_data(args.dataset or default_dataset("cifar10"), train_size=args.images, eval_size=1)
    processor = image_processor(backbone, args.image_size)
    to_pixels = image_transform(processor, data.image_column, data.label_column)
    model = apply_setting(load_backbone(backbone), "memory-masked", num_labels=data.num_labels, m=5)
    recipe, accelerator = paper_recipe(model, lr=0.01, warmup_steps=0, total_steps=1000), make_accelerator()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        cache = build_cache(
            model.eval(), data.train, to_pixels, Path(folder, "cache"), args.image_size, processor, args.batch_size
        )
        build_seconds = (time.perf_counter() - started) / len(cache)
        per_image = cache_bytes_per_image(Path(folder, "cache"))
        model.train()
        batches = range(0, len(cache) - args.batch_size + 1, args.batch_size)

        def step(inputs, labels):  # one step of the library's loop
            next(optimizer_steps(model, [inputs], lambda m, batch: m(**batch, labels=labels).loss, recipe, accelerator))

        def on_images(start):
            batch = to_pixels(data.train[start : start + args.batch_size])  # decoded and processed, as a loader would
            step({"pixel_values": batch["pixel_values"], "interpolate_pos_encoding": True}, batch["labels"])

        def on_cache(start, read_seconds):
            began = time.perf_counter()
            rows = cache.batch(range(start, start + args.batch_size))  # read from the memory-mapped Arrow files
            read_seconds.append(time.perf_counter() - began)
            step({"base_keys_values": rows["base_keys_values"]}, rows["labels"])

        pairs, reads = [], []
        for round_ in range(args.repeats + 1):
            start = batches[round_ % len(batches)]
            times = []
            for fn in (on_images, lambda s: on_cache(s, reads)):
                began = time.perf_counter()
                fn(start)
                times.append(time.perf_counter() - began)
            if round_:  # the first round warms up
                pairs.append(times)
    kept = steady_pairs(pairs)
    images_s, cache_s = statistics.median(t[0] for t in kept), statistics.median(t[1] for t in kept)
    print(
        f"{args.image_size} px, batch {args.batch_size}, memory-masked m=5, {torch.get_num_threads()} threads, "
        f"{len(cache)} images cached\n"
    )
    print("| training step | seconds | images / s |")
    print("|---|---|---|")
    print(f"| on the images | {images_s:.3f} | {args.batch_size / images_s:.1f} |")
    print(f"| on the cache (fp16), reading the batch included | {cache_s:.3f} | {args.batch_size / cache_s:.1f} |")
    read_s = statistics.median(reads[1:])
    print(f"| of which reading the batch from disk | {read_s:.3f} | |")
    print(
        f"\nspeed-up per step: {images_s / cache_s:.1f} x with the read, {images_s / (cache_s - read_s):.1f} x for "
        f"the compute alone (a loader worker reads the next batch meanwhile); cache: {per_image / 1e6:.2f} MB per "
        f"image on disk, built once at {build_seconds * 1e3:.0f} ms per image"
    )


if __name__ == "__main__":
    main()
