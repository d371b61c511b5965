"""Hugging Face Inference Endpoints: the ``handler.py`` a merged artifact carries, serving every task from one forward.

Inference Endpoints imports ``handler.py`` from the repository root and calls ``EndpointHandler(path)`` once, then
``handler({"inputs": image, "parameters": {...}})`` per request. ``memory-peft merge`` writes that file (a subclass
of ``MemoryEndpointHandler``, so the logic stays here and versioned; ``artifact.write_handler``) and its
``requirements.txt``:

    {"inputs": <PIL image | image bytes | base64 string | local path>, "parameters": {"top_k": 3, "tasks": ["cifar"]}}
    -> {"cifar": [{"label": "cat", "score": 0.91}, ...], "fashion": [...]}

A list of images in ``inputs`` gives a list of such results. Bad input (no image, an unknown task or parameter,
``top_k`` < 1) gives ``{"error": "<one line>"}``, never a traceback. The handler loads the base model the artifact
names and runs ``memory_peft.pipelines.MemoryImageClassificationPipeline``: no second inference path.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .artifact import HANDLER_FILE, HANDLER_SOURCE, REQUIREMENTS_FILE, write_handler  # noqa: F401  (re-exported)
from .pipelines import MemoryImageClassificationPipeline
from .sources import load_source
from .tuner.errors import MemoryPeftError

PARAMETERS = ("top_k", "tasks")


class MemoryEndpointHandler:
    """Serve a merged artifact or an adapter folder (``path``; the repository root on Inference Endpoints).

    Args:
        path: the artifact or adapter folder (or Hub id).
        backbone: the base model's Hub id or folder (default: the one the adapters name).

    Example:
        >>> handler = MemoryEndpointHandler("outputs/merged")  # doctest: +SKIP
        >>> handler({"inputs": Image.open("cat.png"), "parameters": {"top_k": 2}})  # doctest: +SKIP
        {'cifar': [{'label': 'cat', 'score': 0.91}, {'label': 'dog', 'score': 0.05}], 'fashion': [...]}
    """

    def __init__(self, path: str = ".", backbone: str | None = None) -> None:
        model, _ = load_source(str(path), backbone)
        self.pipeline = MemoryImageClassificationPipeline(model)
        self.tasks = list(self.pipeline.tasks)

    def __call__(self, data: dict) -> dict | list[dict]:
        try:
            images, top_k, tasks = self._request(data)
            results = self._classify(images, top_k, tasks)
        except (MemoryPeftError, ValueError) as exc:
            return {"error": str(exc).splitlines()[0]}
        return results if isinstance(data.get("inputs"), list) else results[0]

    def _classify(self, images: list[Image.Image], top_k: int, tasks: list[str]) -> list[dict]:
        """Every image of a request in one batched forward (1.3 x the throughput of one forward per image for 8 images
        on a CPU: docs/benchmarks.md)."""
        ranked = self.pipeline(images, top_k=top_k, batch_size=len(images))
        ranked = [r if isinstance(r, dict) else {self.tasks[0]: r} for r in ranked]
        return [{task: r[task] for task in tasks} for r in ranked]

    def _request(self, data) -> tuple[list[Image.Image], int, list[str]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('The request must be a JSON object {"inputs": <image>, "parameters": {...}}.')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(
                f'"parameters" must be an object with {list(PARAMETERS)}, got {type(parameters).__name__}.'
            )
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"Unknown parameter(s) {unknown}: this endpoint takes {list(PARAMETERS)}.")
        top_k = parameters.get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f'"top_k" must be an integer >= 1, got {top_k!r}.')
        tasks = parameters.get("tasks", self.tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f'"tasks" must be a non-empty list of task names from {self.tasks}, got {tasks!r}.')
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise ValueError(f"Unknown task(s) {missing}: this endpoint serves {self.tasks}.")
        inputs = data["inputs"]
        images = [_image(item) for item in (inputs if isinstance(inputs, list) else [inputs])]
        if not images:
            raise ValueError('"inputs" is an empty list: send an image, or a list of images.')
        return images, top_k, tasks


def _image(item) -> Image.Image:
    """A request's image: a PIL image (Inference Endpoints decodes image bodies), raw bytes, base64 text or a path."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, str):
        if Path(item).is_file():
            return _opened(Path(item).read_bytes())
        try:
            item = base64.b64decode(item.split(",", 1)[-1], validate=True)  # also a data: URL's payload
        except (binascii.Error, ValueError):
            raise ValueError('"inputs" is text that is neither a file path nor base64 image data.') from None
    if isinstance(item, (bytes, bytearray)):
        return _opened(bytes(item))
    raise ValueError(f'"inputs" must be an image (PIL image, bytes or base64 text), got {type(item).__name__}.')


def _opened(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError):
        raise ValueError('"inputs" is not an image PIL can read (PNG, JPEG, ...).') from None
    return image.convert("RGB")
