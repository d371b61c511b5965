"""benchmarks/preprocessing.py: each backend transformers can load here is timed through the training transform, and
one that is not installed is said to be absent, not skipped in silence."""

import sys

import pytest
from conftest import ROOT, SHARED
from transformers.utils import is_torchvision_available


def test_every_backend_is_timed_or_said_absent(capsys):
    if not (SHARED / "models" / "vit-small-patch14-dinov2").is_dir() or not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled backbone or CIFAR-10 not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import preprocessing

    arguments = ["--images", "8", "--batch_size", "4", "--sizes", "28", "--repeats", "1", "--threads", "1"]
    facts = preprocessing.main(arguments)
    assert facts[28, "pil", 1] > 0
    table = capsys.readouterr().out
    if is_torchvision_available():
        assert facts[28, "torchvision", 1] > 0
        largest, mean = facts["difference", 28]
        assert 0 <= mean <= largest < 0.1  # a few of 255 levels at most, in normalised units
    else:
        assert facts[28, "torchvision", 1] is None
        assert "| 28 | torchvision | not installed | 1 |" in table
