"""Property-based tests: bad values for every ``adapter_config.json`` field and for the training command's numeric
and path arguments. Every case ends in the package's one-line error (or, for a value that happens to be valid, a
normal result), never another exception or a traceback, and nothing is left on disk. Bounded: a few hundred cases."""

import json
import shutil
from dataclasses import fields

import pytest
from conftest import tiny_vit
from helpers import save_adapter, snapshot
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memory_peft import MemoryTokenConfig, load_adapters
from memory_peft.train_args import _COUNTS
from memory_peft.training import main as train_main
from memory_peft.tuner.errors import MemoryPeftError

# derandomize: the same cases on every machine, so a CI run tests what a local run tested
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONFIG_FIELDS = sorted(f.name for f in fields(MemoryTokenConfig) if f.init)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(tiny_vit(), folder, seed=0, m=2)
    return folder


def one_line(error: BaseException) -> bool:
    return isinstance(error, MemoryPeftError) and "\n" not in str(error) and str(error).strip() != ""


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON_VALUES)
@example(field="num_labels", value=10**12)  # a head of 10**12 rows: refused from the file's header, never allocated
@example(field="m", value=10**12)
def test_any_value_of_any_config_field_loads_or_is_refused_in_one_line(saved, tmp_path_factory, field, value):
    folder = tmp_path_factory.mktemp("case") / "adapter"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(folder.parent)
    try:
        model = load_adapters(tiny_vit(), {"task": str(folder)})
    except Exception as error:  # noqa: BLE001  (the property: only the package's one-line errors)
        assert one_line(error), f"{field}={value!r}: {type(error).__name__}: {error}"
    else:
        assert model.peft_config["task"].peft_type == "MEMORY_TOKENS"
    assert snapshot(folder.parent) == before


BAD_NUMBERS = st.one_of(
    st.sampled_from(sorted(_COUNTS)).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.integers(-(10**6), _COUNTS[name][0] - 1).map(str)
            | (st.integers(_COUNTS[name][1] + 1, 2**64).map(str) if _COUNTS[name][1] is not None else st.nothing()),
        )
    ),
    st.tuples(st.just("lr"), st.sampled_from(["0", "-1", "nan", "inf", "-inf", "-1e-9"])),
    st.tuples(st.just("grad_clip"), st.sampled_from(["-1", "nan", "inf", "-0.5"])),
    st.tuples(st.just("train_val_split"), st.sampled_from(["-0.1", "1", "1.5", "nan", "inf"])),
)


def run_train(argv) -> str:
    with pytest.raises(SystemExit) as exited:
        train_main([str(a) for a in argv])
    return str(exited.value.code)


@FUZZ
@given(option=BAD_NUMBERS)
def test_a_bad_number_for_train_is_one_line_before_any_folder_is_made(tmp_path_factory, option):
    out = tmp_path_factory.mktemp("run") / "out"
    name, value = option
    message = run_train(["--output_dir", out, f"--{name}={value}"])  # "=": a negative value is not an option
    assert message.startswith(f"error: --{name} ") and "\n" not in message, message
    assert not out.exists()


PATH_KINDS = st.sampled_from(["missing", "file", "empty folder", "nested missing"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["dataset", "backbone", "cache_base", "output_dir"]), kind=PATH_KINDS)
def test_a_bad_path_for_train_is_one_line_and_leaves_nothing(tmp_path_factory, option, kind):
    root = tmp_path_factory.mktemp("paths")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    path = {
        "missing": root / "missing",
        "file": root / "a_file",
        "empty folder": root / "empty",
        "nested missing": root / "missing" / "deeper",
    }[kind]
    if option == "cache_base" and kind in ("missing", "nested missing", "empty folder"):
        return  # a cache folder that does not exist yet is built there: not a bad value
    if option == "output_dir" and kind != "file":
        return  # a new or empty output folder is where a run goes: not a bad value
    before = snapshot(root)
    argv = ["--output_dir", root / "out", f"--{option}", path, "--max_steps", "1", "--train_size", "8"]
    if option == "cache_base":
        argv += ["--setting", "memory-masked"]
    message = run_train(argv)
    assert message.startswith("error: ") and "\n" not in message, message
    assert snapshot(root) == before and sorted(p.name for p in root.iterdir()) == ["a_file", "empty"]
