"""Names that are not local folders, with the network down: one ``error:`` line that says the Hub could not be
reached, for every command, both the real path (an endpoint that refuses connections, ``HF_HUB_OFFLINE`` unset) and
offline mode (``HF_HUB_OFFLINE=1``).

Each case runs in a fresh process, as a user's command does (huggingface_hub reads its endpoint at import). Retries
are turned off there so that the real connection path is exercised in a second, not huggingface_hub's ~27 s of
back-off; nothing else is changed.
"""

import os
import socket
import subprocess
import sys

import pytest

# huggingface_hub's back-off (5 retries, 1 + 2 + 4 + 8 + 8 s) turned off: a private function, so only if it exists
NO_RETRIES = """
import huggingface_hub.utils._http as http
if hasattr(http, "_http_backoff_base"):
    _backoff = http._http_backoff_base
    http._http_backoff_base = lambda *args, **kwargs: _backoff(*args, **{**kwargs, "max_retries": 0})
"""
RUN = (
    NO_RETRIES
    + """
import sys
from memory_peft.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["refused", "offline"])
def network_down(request, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    if request.param == "refused":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    else:
        env["HF_HUB_OFFLINE"] = "1"
    return request.param, env


def memory_peft(env, cwd, *args):
    result = subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return result.returncode, result.stderr.strip()


def assert_one_line_about_the_hub(code, stderr, name, mode):
    assert code == 1, stderr[-2000:]
    last = stderr.splitlines()[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith(f"error: {name}") and "is not a local folder and the Hub could not be reached" in last, last
    assert last.endswith("check the path or the network."), last
    assert ("HF_HUB_OFFLINE" in last) == (mode == "offline"), last


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "runs/nope"],
        ["evaluate", "runs/nope"],
        ["inspect", "nope"],
        ["split", "someone/artifact", "--output", "out"],
    ],
)
def test_adapter_names_that_are_not_folders(network_down, tmp_path, command):
    mode, env = network_down
    code, stderr = memory_peft(env, tmp_path, *command)
    assert_one_line_about_the_hub(code, stderr, command[1], mode)
    assert not (tmp_path / "out").exists()


def test_a_dataset_folder_that_is_missing_reads_as_a_hub_id(network_down, tmp_path):
    mode, env = network_down
    code, stderr = memory_peft(env, tmp_path, "train", "--dataset", "data/cifar10", "--output_dir", "run")
    assert_one_line_about_the_hub(code, stderr, "data/cifar10 (dataset)", mode)
    assert not (tmp_path / "run").exists()  # a run that fails before training leaves nothing behind


def test_a_hub_backbone_id(network_down, tmp_path):
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    for split in ("train", "test"):
        datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (16, 16))] * 2, "label": [0, 1]}, features=features
        ).to_parquet(tmp_path / "data" / f"{split}.parquet")
    mode, env = network_down
    code, stderr = memory_peft(
        env,
        tmp_path,
        "train",
        "--dataset",
        "data",
        "--output_dir",
        "run",
        "--backbone",
        "google/vit-base-patch32-224-in21k",
        "--batch_size",  # one full step in the two images: the backbone is what fails
        "2",
    )
    assert_one_line_about_the_hub(code, stderr, "google/vit-base-patch32-224-in21k (base model)", mode)
    assert not (tmp_path / "run").exists()  # a run that fails before training leaves nothing behind


LIBRARY = (
    NO_RETRIES
    + """
import sys
from memory_peft import load_adapters
from memory_peft.hub import HubUnreachableError
sys.path.insert(0, sys.argv[1])
from conftest import tiny_vit
try:
    load_adapters(tiny_vit(), {"task": "someone/adapter"})
except HubUnreachableError as error:
    print(error, file=sys.stderr)
    sys.exit(1)
"""
)


def test_load_adapters_from_python_says_the_hub_could_not_be_reached(network_down, tmp_path):
    """The library call too, not only the command: memory_peft.hub says why the tuner's download failed."""
    mode, env = network_down
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY, tests], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert message.startswith("someone/adapter is not a local folder and the Hub could not be reached"), message
    assert ("HF_HUB_OFFLINE" in message) == (mode == "offline"), message
