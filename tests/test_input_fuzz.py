"""Fuzzing the input side (issue 8, reliability part 2).

Malformed config.json files, safetensors files and shard indexes, golden manifests and case
files, token ids and skip / xfail files must each end in a one-line error naming the
problem: a RefimplError (library) or ConformanceError (suite) subclass, or on the command
line exit status 2 with exactly one stderr line ``error: ...``. Never a traceback, a bare
Python / NumPy exception (KeyError, ValueError, IndexError, MemoryError, RecursionError...),
a hang, or an allocation sized by the input. Nothing is ever unpickled.

Hypothesis runs derandomised, without a database, with 25-50 examples per test; each example
runs under a time limit and (in-process) an address-space cap of the current size + 1 GiB;
whole-process checks run in a subprocess capped at 4 GiB. The hand-made malformed files are
in ``tests/fuzz_corpus/`` (its README says what is wrong with each). Failures in files this
test does not own are strict xfails whose reason is the reproducer; the generic fuzz steps
around them with :func:`known_bug` so that it stays a regression test for everything else.
The exhaustive sweep (every config field of every architecture, deleted or replaced by each
bad value) is marked slow.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refimpl
import refimpl.cli
from conformance.cli import cli as conformance_cli
from conformance.errors import ConformanceError, ManifestError
from conformance.expectations import ExpectationError, Expectations, parse_file
from conformance.manifest import (
    load_case_data, load_case_mtp_logits, load_op_data, read_manifest, verify_case_files,
)
from conformance.runner import check_op_case
from fuzz_helpers import (
    CORPUS, DELETE, GIB, ROOT, TINY_QWEN3, address_space_limit, assert_one_line_error,
    assert_process_one_line_error, config_paths, invoke, mutated, no_isolate, random_weights, refused_or_done,
    run_process, safetensors_bytes, sha256, time_limit, tiny_configs, write_checkpoint, write_manifest,
    write_tiny_golden,
)
from refimpl.checkpoint import open_checkpoint, read_header, read_weights
from refimpl.errors import CheckpointError, ConfigError, InputError, RefimplError
from refimpl.generate import full_forward_next_logits, greedy_generate
from refimpl.model import Model
from refimpl.registry import get_architecture

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
FUZZ_50 = settings(FUZZ, max_examples=50)
CONFIGS = tiny_configs()
V = TINY_QWEN3["vocab_size"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny Qwen3; tests that alter it copy it first."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return refimpl.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A tiny golden directory (one model case, one op case); tests must not alter it."""
    root = tmp_path_factory.mktemp("golden")
    write_tiny_golden(root)
    return root


@pytest.fixture
def golden_copy(golden, tmp_path) -> Path:
    return Path(shutil.copytree(golden, tmp_path / "golden", symlinks=True))


def _word_level_tokenizer(path: Path) -> None:
    """A whitespace word-level tokenizer.json whose ids stay below V."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "hi", "there", "a", "b", "c"]
    vocabulary = {word: i for i, word in enumerate(words)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def generate_checkpoint(tmp_path_factory) -> Path:
    """The tiny Qwen3 with a tokenizer.json, for ``llm-refimpl generate``; tests copy it."""
    directory = write_checkpoint(tmp_path_factory.mktemp("generate") / "checkpoint")
    _word_level_tokenizer(directory / "tokenizer.json")
    return directory


@pytest.fixture
def generate_copy(generate_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(generate_checkpoint, tmp_path / "checkpoint"))


def _generate(directory, *extra):
    return invoke(refimpl.cli.cli, "generate", directory, "--prompt", "hi there", "--max-new-tokens", "1", *extra)


def test_valid_inputs_pass_every_path(tiny_model, golden, generate_checkpoint):
    # The fixtures the malformed inputs are made from are themselves accepted.
    assert tiny_model(np.array([[1, 2, 3]])).shape == (1, 3, V)
    result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden,
                    *no_isolate(conformance_cli.commands["run"]))
    assert result.exit_code == 0, result.output
    result = _generate(generate_checkpoint)
    assert result.exit_code == 0, result.output


# ---- config.json --------------------------------------------------------------------------------------------------

def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, path + (i,))
    else:
        yield path, value


def known_bug(raw: dict) -> str | None:
    """The reproducer of a reported failure (a strict xfail below) this config would hit, or None.

    Empty at present: every config failure the fuzz reported is fixed and covered again. A
    new one gets a line here (matching its configs) next to its strict xfail."""
    return None


#: Values that break configs: wrong JSON kinds, signs, zero, overflowing sizes, non-finite floats.
BAD_VALUES = [None, "", "x", True, False, 0, -1, 1, 2, 3, 10**12, 2**63, 2**64, 10**400, 1.5, -0.5, 0.0, float("nan"),
              float("inf"), -float("inf"), 1e308, 1e-320, [], [1], [0, -1], {}, {"a": 1}, "sliding_attention",
              "full_attention", "yarn", "llama3", "linear", "default", "dynamic"]


def _near(value):
    """Values close to a valid one: off by one, doubled, halved, negated, a list shortened."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([value - 1, value + 1, value * 2, value // 2, -value, value * 1000 + 7])
    if isinstance(value, float):
        return st.sampled_from([value * 2, value / 2, -value, value * 1e6, value * 1e-6])
    if isinstance(value, list) and value:
        return st.sampled_from([value[:-1], value + value[-1:], value[::-1], [value[0]] * (len(value) + 3)])
    return st.sampled_from(BAD_VALUES)


def _bad_value():
    return st.one_of(st.sampled_from(BAD_VALUES), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                     st.lists(st.integers(-3, 70), max_size=5))


@st.composite
def config_mutations(draw, base: dict) -> dict:
    """``base`` with 1 to 3 entries deleted, replaced by a bad value, or nudged off a valid one."""
    raw = base
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(config_paths(raw) or [("architectures",)]))
        current = dict(_leaves(raw)).get(path)
        raw = mutated(raw, path, draw(st.one_of(st.just(DELETE), _bad_value(), _near(current))))
    return raw


def run_config(raw: dict):
    """Build the model of a parsed config.json with small random weights and run 7 tokens;
    an accepted config must give finite logits of the right shape, which are returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arch = get_architecture(raw)
        config = arch.config_class.from_dict(raw)
        weights = random_weights(arch, config)
        if weights is None:
            return "accepted; too big to run here"
        logits = Model(arch, config, weights, np.float64)((np.arange(7) % config.vocab_size)[None])
    assert logits.shape == (1, 7, config.vocab_size)
    assert np.isfinite(logits).all(), "an accepted config gives non-finite logits"
    return logits


def _probe_config(raw: dict):
    with address_space_limit(GIB):
        return refused_or_done(lambda: run_config(raw), (RefimplError,), seconds=20)


def test_every_architecture_has_a_tiny_config():
    from refimpl.registry import ARCHITECTURES

    assert sorted(CONFIGS) == sorted(ARCHITECTURES)
    for raw in CONFIGS.values():
        assert isinstance(run_config(raw), np.ndarray)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@FUZZ
@given(data=st.data())
def test_config_mutations_are_refused_or_run(name, data):
    raw = data.draw(config_mutations(CONFIGS[name]), label="config.json")
    assume(known_bug(raw) is None)
    _probe_config(raw)


SWEEP_VALUES = [DELETE, *BAD_VALUES, 1 << 16, (1 << 16) + 1, 1 << 24, (1 << 24) + 1, 1e-10, 1e10, -1e300, 5e-324]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_deleted_or_replaced_by_each_bad_value(name):
    for path in config_paths(CONFIGS[name]):
        for value in SWEEP_VALUES:
            raw = mutated(CONFIGS[name], path, value)
            if known_bug(raw) is None:
                _probe_config(raw)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nan_and_infinity_literals_in_config_json_are_refused_or_ignored(name):
    # Python's json (and transformers) read the non-JSON literals NaN / Infinity. A float
    # field holding one is refused, or is a key the architecture deliberately ignores.
    base = CONFIGS[name]
    expected = run_config(base)
    floats = [path for path, value in _leaves(base) if isinstance(value, float)]
    assert floats, name
    for path in floats:
        for literal in ("NaN", "Infinity", "-Infinity"):
            raw = json.loads(json.dumps(mutated(base, path, float(literal))))
            outcome = _probe_config(raw)
            if not isinstance(outcome, ConfigError):
                np.testing.assert_array_equal(outcome, expected, err_msg=f"{path} = {literal} changed the logits")


#: tests/fuzz_corpus/config/<file>: a fragment of the error message (the field or the problem).
CONFIG_CORPUS = {
    "not-json.json": "cannot read JSON", "not-an-object.json": "expected a JSON object",
    "empty.json": "cannot read JSON",
    "not-utf8.json": "cannot read JSON", "no-architectures.json": "'architectures'",
    "unknown-architecture.json": "unknown architecture 'FancyNewForCausalLM'",
    "two-architectures.json": "exactly one entry in 'architectures'",
    "architectures-not-list.json": "exactly one entry in 'architectures'",
    "hidden-size-string.json": "'hidden_size' must be an integer", "layers-float.json": "'num_hidden_layers'",
    "layers-bool.json": "'num_hidden_layers'", "heads-null.json": "'num_attention_heads'",
    "heads-zero.json": "'num_attention_heads' must be a positive integer", "vocab-negative.json": "'vocab_size'",
    "layers-huge.json": "'num_hidden_layers' is 1000000000000", "head-dim-list.json": "'head_dim'",
    "missing-hidden-size.json": "'hidden_size'", "kv-heads-not-dividing.json": "num_key_value_heads",
    "eps-nan-literal.json": "rms_norm_eps", "theta-infinity-literal.json": "rope_theta",
    "eps-integer-400-digits.json": "'rms_norm_eps'",
}
CONFIG_CORPUS.update({
    "nested-too-deep.json": "cannot read JSON (nested too deeply)",
    "integer-5000-digits.json": "cannot read JSON (Exceeds the limit (4300 digits)",
})
#: Corpus files whose refusal is still missing: name -> (fragment, reproducer). None at present.
CONFIG_CORPUS_XFAIL: dict[str, tuple[str, str]] = {}


def _corpus_params(expected: dict, xfails: dict):
    params = [pytest.param(name, fragment, id=name) for name, fragment in sorted(expected.items())]
    params += [pytest.param(name, fragment, id=name, marks=pytest.mark.xfail(strict=True, reason=reason))
               for name, (fragment, reason) in sorted(xfails.items())]
    return params


@pytest.mark.parametrize("name,fragment", _corpus_params(CONFIG_CORPUS, CONFIG_CORPUS_XFAIL))
def test_corpus_config_is_refused_by_from_pretrained(name, fragment, checkpoint_copy):
    shutil.copy(CORPUS / "config" / name, checkpoint_copy / "config.json")
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, RefimplError) and fragment in str(error), error


@pytest.mark.parametrize("name,fragment", _corpus_params(CONFIG_CORPUS, CONFIG_CORPUS_XFAIL))
def test_corpus_config_is_one_error_line_of_generate(name, fragment, generate_copy):
    shutil.copy(CORPUS / "config" / name, generate_copy / "config.json")
    with time_limit(30):
        assert_one_line_error(_generate(generate_copy), fragment)


def test_deep_generation_config_is_one_error_line(generate_copy):
    # json.loads raised RecursionError (refimpl/checkpoint.py read_json).
    (generate_copy / "generation_config.json").write_text('{"eos_token_id": ' + "[" * 5000 + "]" * 5000 + "}")
    assert_one_line_error(_generate(generate_copy), "generation_config.json", "nested too deeply")


def test_config_json_fifo_does_not_hang(checkpoint_copy):
    # read_json's read_text() blocked for ever on a FIFO; it is now refused before it is opened.
    (checkpoint_copy / "config.json").unlink()
    os.mkfifo(checkpoint_copy / "config.json")
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,), seconds=2)
    assert isinstance(error, CheckpointError) and "config.json: not a regular file" in str(error), error


def test_a_fifo_shard_does_not_hang(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    os.mkfifo(checkpoint_copy / "shard1.safetensors")
    (checkpoint_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "shard1.safetensors"}}))
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,), seconds=2)
    assert isinstance(error, CheckpointError) and "shard1.safetensors: not a regular file" in str(error), error


@pytest.mark.parametrize("key,value", [("beta_fast", 1e308), ("beta_slow", 5e-324)])
def test_yarn_betas_whose_correction_dimension_overflows_are_config_errors(key, value):
    # corr() computes L / (beta * 2 pi): 0 for beta_fast = 1e308 (math domain error), inf for
    # beta_slow = 5e-324 (OverflowError in math.ceil).
    raw = mutated(CONFIGS["DeepseekV3ForCausalLM"], ("rope_parameters", key), value)
    outcome = _probe_config(raw)
    assert isinstance(outcome, ConfigError) and f"{key} = {value!r} is out of range" in str(outcome), outcome


@pytest.mark.parametrize("value", [1e308, 10**400, 1.5, 0.0, -0.5])
def test_partial_rotary_factor_outside_0_to_1_is_a_config_error(value):
    # int(head_dim * 1e308) raised OverflowError before the range check.
    raw = mutated(CONFIGS["Qwen3NextForCausalLM"], ("partial_rotary_factor",), value)
    outcome = _probe_config(raw)
    assert isinstance(outcome, ConfigError) and "partial_rotary_factor" in str(outcome), outcome


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grok_output_scale_that_overflows_the_logits_is_named(dtype):
    # The float maximum was accepted and the logits were inf; 1e300 overflows float32 only.
    for scale in (float(np.finfo(np.float64).max), 1e300):
        raw = mutated(CONFIGS["Grok1ForCausalLM"], ("output_multiplier_scale",), scale)
        arch, config = get_architecture(raw), get_architecture(raw).config_class.from_dict(raw)
        model = Model(arch, config, random_weights(arch, config), dtype)
        outcome = refused_or_done(lambda: model(np.arange(7)[None] % config.vocab_size), (RefimplError,))
        if dtype == np.float64 and scale == 1e300:
            assert isinstance(outcome, np.ndarray) and np.isfinite(outcome).all()
        else:
            assert isinstance(outcome, ConfigError) and "output_multiplier_scale" in str(outcome), outcome


@pytest.mark.parametrize("name", ["Qwen3ForCausalLM", "Llama4ForCausalLM"])
def test_integer_rope_theta_beyond_int64_runs_as_its_float(name):
    # np.isfinite(2**64) raised TypeError (refimpl/models/_llama_like.py); 2**64 is a valid theta.
    as_int = _probe_config(mutated(CONFIGS[name], ("rope_parameters", "rope_theta"), 2**64))
    as_float = _probe_config(mutated(CONFIGS[name], ("rope_parameters", "rope_theta"), float(2**64)))
    assert isinstance(as_int, np.ndarray), as_int
    np.testing.assert_array_equal(as_int, as_float)
    outcome = _probe_config(mutated(CONFIGS[name], ("rope_parameters", "rope_theta"), 10**400))
    assert isinstance(outcome, ConfigError) and "rope_theta" in str(outcome), outcome


@pytest.mark.parametrize("name,path,fragment", [
    ("DeepseekV3ForCausalLM", ("rope_parameters", "original_max_position_embeddings"),
     "'original_max_position_embeddings'] must be a positive integer <= 16777216"),
    ("GptOssForCausalLM", ("rope_scaling", "original_max_position_embeddings"),
     "'original_max_position_embeddings'] must be a positive integer <= 16777216"),
    ("Llama4ForCausalLM", ("rope_parameters", "low_freq_factor"), "'low_freq_factor'"),
])
def test_rope_integers_beyond_the_float_range_are_config_errors(name, path, fragment):
    # OverflowError (int too large to convert to float) in refimpl/rope.py and refimpl/models/llama4.py.
    outcome = _probe_config(mutated(CONFIGS[name], path, 10**400))
    assert isinstance(outcome, ConfigError) and fragment in str(outcome), outcome


def test_integers_beyond_the_float_range_are_config_errors():
    # float(10**400) raises OverflowError; where config.json wants a number, the field is named instead.
    raw = mutated(CONFIGS["Qwen3ForCausalLM"], ("rms_norm_eps",), 10**400)
    outcome = _probe_config(raw)
    assert isinstance(outcome, ConfigError) and "'rms_norm_eps'" in str(outcome), outcome


def test_long_layer_schedules_are_not_quadratic():
    # Llama 4's moe_layers and Qwen3-MoE's mlp_only_layers were looked up in lists: 65536 layers took 44 s.
    from refimpl.moe import interleaved_schedule, sparse_step_schedule

    with time_limit(5):
        assert sum(interleaved_schedule(65536, 1)) == 65536
        assert sum(sparse_step_schedule(65536, 1, list(range(0, 65536, 2)))) == 32768


def test_count_fields_above_the_count_limit_are_refused():
    # 2**24 AltUp streams built 16M weight names (MemoryError) before this limit.
    raw = mutated(CONFIGS["Gemma3nForCausalLM"], ("altup_num_inputs",), 1 << 24)
    outcome = _probe_config(raw)
    assert isinstance(outcome, ConfigError) and "altup_num_inputs" in str(outcome)


# ---- safetensors files and shard indexes --------------------------------------------------------------------------

#: tests/fuzz_corpus/safetensors/<file>, put as model.safetensors: a fragment of the CheckpointError.
SAFETENSORS_CORPUS = {
    "empty.safetensors": "header length", "shorter-than-length.safetensors": "header length",
    "header-length-beyond-file.safetensors": "header length 1000 does not fit",
    "header-length-2-63.safetensors": "header length 9223372036854775808",
    "header-not-json.safetensors": "cannot read safetensors", "header-not-an-object.safetensors": "not a JSON object",
    "header-not-utf8.safetensors": "cannot read safetensors", "offsets-beyond-data.safetensors": "'a' data_offsets",
    "offsets-reversed.safetensors": "'a' data_offsets", "offsets-negative.safetensors": "'a' data_offsets",
    "offsets-overlap.safetensors": "'a' and 'b' overlap", "shape-bytes-mismatch.safetensors": "'a' has 8 bytes",
    "huge-shape.safetensors": "needs 4000000000000", "shape-overflows-int64.safetensors": "'a' has 8 bytes",
    "negative-shape.safetensors": "entry 'a'", "float-offsets.safetensors": "entry 'a'",
    "missing-dtype.safetensors": "entry 'a'", "entry-not-an-object.safetensors": "entry 'a'",
    "unknown-dtype.safetensors": "'a' is stored as F31", "integer-dtype.safetensors": "'a' is stored as I64",
    "zip-archive.safetensors": "does not fit",
}
SAFETENSORS_CORPUS.update({
    # The safetensors library refuses both ("file not fully covered", "invalid offset").
    "trailing-bytes.safetensors": "the last 4 data bytes are covered by no tensor",
    "hole-between-tensors.safetensors": "data bytes [4, 8) before tensor 'b' are covered by no tensor",
    # The library keeps the last entry silently; the reference refuses.
    "duplicate-names.safetensors": "lists 'a' twice",
    "nested-too-deep.safetensors": "cannot read safetensors (the header is nested too deeply)",
    # Zero bytes, but NumPy cannot make the array ("array is too big").
    "zero-size-huge-dims.safetensors": "tensor 'a' has shape [0, 4611686018427387904]",
})
#: Corpus files whose refusal is still missing: name -> (fragment, reproducer). None at present.
SAFETENSORS_CORPUS_XFAIL: dict[str, tuple[str, str]] = {}


def _read_everything(directory: Path):
    """``read_weights`` (eager, every tensor materialised) and ``from_pretrained`` lazily."""
    read_weights(directory)
    return refimpl.from_pretrained(directory, lazy=True)


@pytest.mark.parametrize("name,fragment", _corpus_params(SAFETENSORS_CORPUS, SAFETENSORS_CORPUS_XFAIL))
def test_corpus_safetensors_is_refused_naming_file_and_tensor(name, fragment, checkpoint_copy):
    shutil.copy(CORPUS / "safetensors" / name, checkpoint_copy / "model.safetensors")
    with address_space_limit(GIB):
        error = refused_or_done(lambda: _read_everything(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError), error
    assert fragment in str(error) and "model.safetensors" in str(error), error


def test_a_huge_declared_shape_is_one_error_line_of_generate(generate_copy):
    shutil.copy(CORPUS / "safetensors" / "huge-shape.safetensors", generate_copy / "model.safetensors")
    assert_one_line_error(_generate(generate_copy), "model.safetensors", "needs 4000000000000")


TENSORS = {"a": ("F32", [2, 3]), "b": ("BF16", [4]), "c": ("F64", [])}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1, "U8": 1,
               "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}


def _valid_file() -> tuple[dict, bytes]:
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape) in TENSORS.items():
        size = int(np.prod(shape)) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += bytes(range(size)) if dtype != "BF16" else b"\x80\x3f" * (size // 2)
    return header, data


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=3))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                        max_leaves=6)


@st.composite
def safetensors_files(draw) -> bytes:
    """A small valid file with its header entries mangled, tensors added or removed, the
    header length lying, or the bytes truncated or flipped."""
    header, data = _valid_file()
    kind = draw(st.sampled_from(["entry", "entry", "entry", "add", "delete", "header", "length", "truncate", "flip"]))
    if kind in ("entry", "add"):
        name = draw(st.sampled_from(sorted(TENSORS))) if kind == "entry" else draw(st.text(max_size=5))
        entry = dict(header.get(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "all"]))
        if field == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPE_BYTES) + ["F31", "f32", ""]), _json_values()))
        elif field == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.one_of(st.integers(-2, 8), st.integers(0, 2**64),
                                                               st.sampled_from([0, 2**31, 2**62, 10**12])), max_size=5),
                                            _json_values()))
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(-8, len(data) + 8), max_size=3),
                                                   st.lists(st.integers(-(2**65), 2**65), max_size=3), _json_values()))
        else:
            entry = draw(_json_values())
        header[name] = entry
    elif kind == "delete":
        header.pop(draw(st.sampled_from(sorted(header))))
    elif kind == "header":
        return safetensors_bytes(json.dumps(draw(_json_values())), data)
    raw = safetensors_bytes(header, data)
    if kind == "length":
        raw = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + raw[8:]
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    return raw


def _check_accepted_header(raw: bytes, tensors) -> None:
    """What read_header accepts must be a layout the bytes can hold (the spec, checked here):
    each tensor inside the data, as long as its shape and dtype say, and, sorted, the tensors
    tiling the data bytes exactly (the safetensors library's rule)."""
    start = 8 + int.from_bytes(raw[:8], "little")
    spans = []
    for t in tensors.values():
        assert start <= t.begin <= t.end <= len(raw), t
        if t.dtype in DTYPE_BYTES:
            assert t.end - t.begin == int(np.prod(t.shape, dtype=object)) * DTYPE_BYTES[t.dtype], t
        spans.append((t.begin, t.end))
    ends = [start] + [end for _, end in sorted(spans)]
    assert [begin for begin, _ in sorted(spans)] == ends[:-1], f"gaps or overlaps accepted: {sorted(spans)}"
    assert ends[-1] == len(raw), f"bytes after the last tensor accepted: {sorted(spans)}, {len(raw)} bytes"


@pytest.mark.parametrize("offsets,accepted", [
    # An empty tensor at either end or between two tensors is where the library puts it; inside one it is not.
    ({"a": [0, 8], "z": [0, 0]}, True), ({"a": [0, 8], "z": [8, 8]}, True), ({"a": [0, 8], "z": [4, 4]}, False),
    ({"a": [0, 8], "b": [8, 16], "z": [8, 8]}, True), ({"a": [0, 8], "b": [8, 16]}, True),
    ({"a": [0, 8], "b": [12, 20]}, False), ({"a": [4, 12]}, False),
])
def test_tensors_must_tile_the_data_exactly(offsets, accepted, tmp_path):
    header = {name: {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
              for name, (begin, end) in offsets.items()}
    raw = safetensors_bytes(header, bytes(max(end for _, end in offsets.values())))
    (tmp_path / "model.safetensors").write_bytes(raw)
    outcome = refused_or_done(lambda: read_header(tmp_path / "model.safetensors"), (CheckpointError,))
    assert isinstance(outcome, dict) == accepted, outcome
    if accepted:
        _check_accepted_header(raw, outcome)
    else:
        assert re.search("overlap|covered by no tensor", str(outcome)), outcome


@pytest.mark.parametrize("name", ["\n", "a\nb", "x\r", "\x00", "tab\there", "\u2028"])
def test_tensor_names_that_would_break_a_message_line_are_refused(name, tmp_path):
    # Found by the fuzz: a tensor named "\n" gave a two-line error message.
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              name: {"dtype": "BF16", "shape": [1], "data_offsets": [0, 4]}}
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(4)))
    error = refused_or_done(lambda: read_header(tmp_path / "model.safetensors"), (CheckpointError,))
    assert isinstance(error, CheckpointError) and f"tensor name {name!r} holds" in str(error), error


@pytest.mark.parametrize("shape,accepted", [
    ([0] * 32, True), ([0] * 33, False), ([0, 2**48], True), ([0, 2**48 + 1], False), ([0, 2**24, 2**25], False),
    ([1] * 32, True), ([1] * 33, False),
])
def test_stored_shapes_are_bounded_even_when_empty(shape, accepted, tmp_path):
    size = 4 * int(np.prod(shape, dtype=object))
    raw = safetensors_bytes({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}}, bytes(size))
    (tmp_path / "model.safetensors").write_bytes(raw)
    tensors = refused_or_done(lambda: read_header(tmp_path / "model.safetensors"), (CheckpointError,))
    if not accepted:
        assert isinstance(tensors, CheckpointError) and "'a' has shape" in str(tensors), tensors
        return
    from refimpl.checkpoint import _MappedFile

    value = refused_or_done(lambda: _MappedFile(tmp_path / "model.safetensors").view(tensors["a"]), ())
    assert value.shape == tuple(shape)


@FUZZ_50
@given(raw=safetensors_files())
def test_mangled_safetensors_are_refused_or_read(raw, tmp_path_factory):
    directory = tmp_path_factory.mktemp("st")
    (directory / "model.safetensors").write_bytes(raw)
    with address_space_limit(GIB):
        tensors = refused_or_done(lambda: read_header(directory / "model.safetensors"), (CheckpointError,))
        if isinstance(tensors, dict):
            _check_accepted_header(raw, tensors)
        opened = refused_or_done(lambda: open_checkpoint(directory, None), (CheckpointError,))
        if isinstance(opened, dict):
            for name, tensor in opened.items():
                value = refused_or_done(lambda: tensor.materialize(np.float64), (CheckpointError,))
                if isinstance(value, np.ndarray):
                    assert value.shape == tensor.shape and value.dtype == np.float64, name


def _sharded(directory: Path, weight_map: dict) -> Path:
    """The tiny checkpoint's tensors in shard1.safetensors, with an index saying ``weight_map``."""
    (directory / "model.safetensors").rename(directory / "shard1.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("weight_map,fragment", [
    ({"lm_head.weight": "missing.safetensors"}, "shard file not found"),
    ({"lm_head.weight": "../outside.safetensors"}, "lies outside"),
    ({"lm_head.weight": "/etc/passwd"}, "lies outside"),
    ({"lm_head.weight": "."}, "lies outside"),
    ({"lm_head.weight": 3}, "'weight_map' must map names to file names"),
    (["shard1.safetensors"], "'weight_map' must map names to file names"),
    ({"lm_head.weight": "shard1.safetensors", "x": "sub"}, "sub"),
    ({"lm_head.weight": "shard1.safetensors", "x": "config.json"}, "config.json"),
    # Path.resolve() raised 'ValueError: embedded null byte'.
    ({"lm_head.weight": "shard\0.safetensors"}, "shard file name 'shard\\x00.safetensors' holds a NUL character"),
])
def test_lying_shard_index_is_refused(weight_map, fragment, checkpoint_copy):
    _sharded(checkpoint_copy, weight_map)
    (checkpoint_copy / "sub").mkdir()
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and fragment in str(error), error


def test_shard_index_symlink_leading_outside_is_refused(checkpoint_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(checkpoint_copy / "model.safetensors", outside / "weights.safetensors")
    (checkpoint_copy / "link.safetensors").symlink_to(outside / "weights.safetensors")
    _sharded(checkpoint_copy, {"lm_head.weight": "link.safetensors"})
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and "lies outside" in str(error), error


def test_tensor_in_two_shards_and_deep_index(checkpoint_copy):
    shutil.copy(checkpoint_copy / "model.safetensors", checkpoint_copy / "shard2.safetensors")
    _sharded(checkpoint_copy, {"lm_head.weight": "shard1.safetensors", "model.norm.weight": "shard2.safetensors"})
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and "more than one shard" in str(error), error
    (checkpoint_copy / "model.safetensors.index.json").write_text("{")
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and "model.safetensors.index.json" in str(error), error


def test_deep_shard_index_is_refused(checkpoint_copy):
    # json.loads raised RecursionError (refimpl/checkpoint.py read_json).
    _sharded(checkpoint_copy, {})
    (checkpoint_copy / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}")
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and "index.json: cannot read JSON (nested too deeply)" in str(error)


# ---- nothing is ever unpickled --------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``Path(marker).touch()``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant_pickle(directory: Path, file_name: str) -> Path:
    """A pickle whose unpickling creates ``directory/UNPICKLED``; returns that marker path."""
    marker = directory / "UNPICKLED"
    (directory / file_name).write_bytes(pickle.dumps({"model.norm.weight": _Payload(marker)}))
    return marker


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling in this process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt",
                                       "model.pth", "model.pkl", "model.ckpt"])
def test_pickled_checkpoints_are_refused_unread(file_name, checkpoint_copy, no_unpickling):
    (checkpoint_copy / "model.safetensors").unlink()
    marker = _plant_pickle(checkpoint_copy, file_name)
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError), error
    assert ("never unpickled" in str(error) and file_name in str(error)) or "neither model.safetensors" in str(error)
    assert not marker.exists()


def test_a_pickle_named_model_safetensors_is_not_a_safetensors_file(checkpoint_copy, no_unpickling):
    marker = _plant_pickle(checkpoint_copy, "model.safetensors")
    error = refused_or_done(lambda: refimpl.from_pretrained(checkpoint_copy), (RefimplError,))
    assert isinstance(error, CheckpointError) and "cannot read safetensors" in str(error)
    assert not marker.exists()


def test_the_transformers_backend_does_not_unpickle_a_pytorch_model_bin(checkpoint_copy, monkeypatch):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from conformance.backends.transformers_backend import TransformersBackend

    (checkpoint_copy / "model.safetensors").unlink()
    marker = _plant_pickle(checkpoint_copy, "pytorch_model.bin")
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    with pytest.raises(Exception) as raised:
        TransformersBackend().load_model(checkpoint_copy, "float32")
    assert loads == [], f"torch.load was called on {loads}"
    assert not marker.exists()
    assert "safetensors" in str(raised.value)


def test_the_run_command_reports_a_pickled_golden_checkpoint_as_an_error(golden_copy, no_unpickling):
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    case = manifest["cases"][0]
    (golden_copy / "m/checkpoint/model.safetensors").unlink()
    marker = _plant_pickle(golden_copy / "m/checkpoint", "pytorch_model.bin")
    case["files"] = {k: v for k, v in case["files"].items() if not k.endswith("model.safetensors")}
    case["files"]["m/checkpoint/pytorch_model.bin"] = sha256(golden_copy / "m/checkpoint/pytorch_model.bin")
    write_manifest(golden_copy, manifest)
    report = golden_copy / "report.json"
    result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden_copy, "--case", "m/*",
                    "--report", report, *no_isolate(conformance_cli.commands["run"]))
    assert result.exit_code == 1, result.output
    (entry,) = json.loads(report.read_text())["results"]
    assert entry["status"] == "error" and "pytorch_model.bin" in entry["message"], entry
    assert "never unpickled" in entry["message"], entry
    assert not marker.exists()


_UNPICKLING = re.compile(r"\bimport\s+(c?pickle|dill|joblib|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|joblib|shelve)\s"
                         r"|\bpickle\.(load|loads|Unpickler)\b|\btorch\.load\s*\(|allow_pickle\s*=\s*True"
                         r"|\bnp\.load\s*\(|\bnumpy\.load\s*\(|weights_only\s*=\s*False")


def test_no_source_file_loads_pickles():
    found = []
    for package in ("refimpl", "conformance"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _UNPICKLING.search(line.split("#", 1)[0]):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
    # transformers would torch.load a pytorch_model.bin: every weight load asks for safetensors.
    for path in sorted((ROOT / "conformance").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"ForCausalLM\.from_pretrained\(", text):
            window = text[call.start() - 600:call.end() + 400]
            assert "use_safetensors" in window, f"{path.relative_to(ROOT)}: from_pretrained without use_safetensors"


# ---- golden manifest and case files ---------------------------------------------------------------------------------

#: tests/fuzz_corpus/manifest/<file>, put as MANIFEST.json: a fragment of the one error line of ``list``.
MANIFEST_CORPUS = {
    "not-json.json": "invalid JSON", "not-an-object.json": "expected a JSON object", "no-cases.json": "lists no cases",
    "cases-not-a-list.json": "field 'cases' must be a list", "case-not-an-object.json": "cases[0]: expected an object",
    "nested-too-deep.json": "nested too deeply", "duplicate-ids.json": "listed more than once: m/tiny",
    "data-path-dotdot.json": "'../outside/io.safetensors' leads outside",
    "data-path-absolute.json": "'/etc/passwd' is absolute", "path-with-nul.json": "NUL character",
    "checkpoint-dotdot.json": "'m/../../checkpoint' leads outside", "digest-not-sha256.json": "sha256 hex digest",
    "level-unknown.json": "level must be one of model, op", "id-escapes.json": "case id '../../escape'",
    "id-empty.json": "case id ''", "missing-data.json": "missing field 'data'",
    "data-not-listed.json": "'m/io.safetensors' is not listed", "mtp-depths-negative.json": "'mtp_depths'",
    "corpus-version-number.json": "field 'corpus_version' must be a str",
    "integer-5000-digits.json": "invalid JSON (Exceeds the limit (4300 digits)",
}


@pytest.mark.parametrize("name", sorted(MANIFEST_CORPUS))
def test_corpus_manifest_is_one_error_line(name, tmp_path):
    shutil.copy(CORPUS / "manifest" / name, tmp_path / "MANIFEST.json")
    with time_limit(10):
        assert_one_line_error(invoke(conformance_cli, "list", "--golden-dir", tmp_path), MANIFEST_CORPUS[name])


def test_symlinks_leading_outside_the_golden_folder_are_refused(golden_copy, tmp_path):
    run = ["run", "--backend", "refimpl", "--golden-dir", golden_copy, *no_isolate(conformance_cli.commands["run"])]
    (golden_copy / "m/checkpoint/escape").symlink_to(tmp_path, target_is_directory=True)
    assert_one_line_error(invoke(conformance_cli, *run), "'m/checkpoint/escape' leads outside")
    (golden_copy / "m/checkpoint/escape").unlink()
    data = golden_copy / "m/io.safetensors"
    shutil.move(data, tmp_path / "io.safetensors")
    data.symlink_to(tmp_path / "io.safetensors")
    assert_one_line_error(invoke(conformance_cli, *run), "'m/io.safetensors' leads outside")


def test_fifos_in_the_golden_folder_do_not_hang(golden_copy):
    run = ["run", "--backend", "refimpl", "--golden-dir", golden_copy, *no_isolate(conformance_cli.commands["run"])]
    os.mkfifo(golden_copy / "m/checkpoint/pipe")
    with time_limit(10):
        assert_one_line_error(invoke(conformance_cli, *run), "'m/checkpoint/pipe' is not a regular file")
    (golden_copy / "m/checkpoint/pipe").unlink()
    (golden_copy / "m/io.safetensors").unlink()
    os.mkfifo(golden_copy / "m/io.safetensors")
    with time_limit(10):
        assert_one_line_error(invoke(conformance_cli, *run), "'m/io.safetensors' is not a regular file")
    shutil.move(golden_copy / "MANIFEST.json", golden_copy / "saved.json")
    os.mkfifo(golden_copy / "MANIFEST.json")
    with time_limit(10):
        assert_one_line_error(invoke(conformance_cli, "list", "--golden-dir", golden_copy), "not a regular file")


def _manifest_values():
    paths = ["../x", "/etc/passwd", "m/../m/io.safetensors", "m/checkpoint", "", ".", "..", "m\\..\\x",
             "m/io\0.safetensors", "op/io.safetensors", "m/io.safetensors", "m/checkpoint/config.json", "C:\\x",
             "m", "m/tiny", "op", "softmax_top_k", "attention", "model_logits", "op_exact", "model", "Qwen3ForCausalLM"]
    return st.one_of(st.sampled_from(paths), st.sampled_from(BAD_VALUES), _json_values(),
                     st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65))


def _check_corpus(golden_dir: Path) -> None:
    """What ``run`` does with the corpus before calling a backend: parse, hash, read and pose every case."""
    for case in read_manifest(golden_dir).cases:
        verify_case_files(golden_dir, case)
        if case.level == "op":
            load_op_data(golden_dir, case)
            check_op_case(golden_dir, case)
        else:
            load_case_data(golden_dir, case)
            load_case_mtp_logits(golden_dir, case)


@FUZZ_50
@given(data=st.data())
def test_mangled_manifests_are_refused_or_read(data, golden, tmp_path_factory):
    manifest = json.loads((golden / "MANIFEST.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(config_paths(manifest)))
        manifest = mutated(manifest, path, data.draw(st.one_of(st.just(DELETE), _manifest_values())))
    work = Path(shutil.copytree(golden, tmp_path_factory.mktemp("golden") / "g"))
    write_manifest(work, manifest)
    refused_or_done(lambda: _check_corpus(work), (ConformanceError,))


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_mangled_manifests_through_the_run_command(data, golden, tmp_path_factory):
    manifest = json.loads((golden / "MANIFEST.json").read_text())
    path = data.draw(st.sampled_from(config_paths(manifest)))
    manifest = mutated(manifest, path, data.draw(st.one_of(st.just(DELETE), _manifest_values())))
    work = Path(shutil.copytree(golden, tmp_path_factory.mktemp("golden") / "g"))
    write_manifest(work, manifest)
    with time_limit(30):
        result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", work,
                        *no_isolate(conformance_cli.commands["run"]))
    if result.exit_code in (0, 1):
        assert isinstance(result.exception, (SystemExit, type(None))) and "Traceback" not in result.output
    else:
        assert_one_line_error(result)


def _id_arrays():
    """Token-id arrays as a golden io.safetensors can store them: any numeric dtype and rank."""
    dtypes = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64, np.float32,
                              np.float64, np.bool_])
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)
    near = hnp.arrays(np.int64, shapes, elements=st.integers(-3, V + 3))
    return st.one_of(near, hnp.arrays(dtypes, shapes))


@FUZZ_50
@given(ids=_id_arrays())
def test_golden_input_ids_must_be_a_token_matrix_of_the_vocabulary(ids, golden, tmp_path_factory):
    from safetensors.numpy import save_file

    work = Path(shutil.copytree(golden, tmp_path_factory.mktemp("golden") / "g"))
    save_file({"input_ids": np.ascontiguousarray(ids), "logits": np.zeros(ids.shape[:2] + (V,))
               if ids.ndim == 2 else np.zeros((1, 1, V))}, str(work / "m/io.safetensors"))
    case = read_manifest(work).cases[0]
    valid = (ids.ndim == 2 and ids.size > 0 and ids.dtype.kind in "iu"
             and bool(((ids.astype(object) >= 0) & (ids.astype(object) < V)).all()))
    outcome = refused_or_done(lambda: load_case_data(work, case), (ConformanceError,))
    if valid:
        assert not isinstance(outcome, Exception), outcome
        np.testing.assert_array_equal(outcome[0], ids)
    else:
        assert isinstance(outcome, ManifestError) and "input_ids" in str(outcome), outcome


@pytest.mark.parametrize("ids,fragment", [
    (np.array([[1.0, 2.0]]), "input_ids must be a 2-D integer array"),
    (np.array([[-1, 2]]), "token id -1 at (0, 0)"),
    (np.array([[3, V]]), f"token id {V} at (0, 1), outside [0, {V})"),
    (np.array([[2**63 + 1]], np.uint64), "token id 9223372036854775809"),
    (np.array([[True, False]]), "input_ids must be a 2-D integer array"),
    (np.zeros((1, 0), np.int64), "input_ids"),
])
def test_bad_golden_input_ids_are_one_error_line_before_any_case_runs(ids, fragment, tmp_path):
    manifest = write_tiny_golden(tmp_path, input_ids=ids)
    assert manifest["cases"][0]["id"] == "m/tiny"
    result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", tmp_path,
                    *no_isolate(conformance_cli.commands["run"]))
    assert_one_line_error(result, "case m/tiny", fragment)


def test_manifest_architecture_contradicting_the_checkpoint(golden_copy):
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["cases"][0]["architecture"] = "MistralForCausalLM"
    write_manifest(golden_copy, manifest)
    result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden_copy,
                    *no_isolate(conformance_cli.commands["run"]))
    assert_one_line_error(result, "'MistralForCausalLM'", "'Qwen3ForCausalLM'")


def test_lying_case_file_headers_are_one_error_line(golden_copy):
    # Shapes declaring 10**12 elements over 8 bytes, and an op case whose params JSON is nested too deep.
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    (golden_copy / "m/io.safetensors").write_bytes(safetensors_bytes(
        {"input_ids": {"dtype": "I64", "shape": [10**6, 10**6], "data_offsets": [0, 8]},
         "logits": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}}, bytes(16)))
    (golden_copy / "op/io.safetensors").write_bytes(safetensors_bytes(
        {"__metadata__": {"case": '{"params": ' + "[" * 5000 + "]" * 5000 + "}"},
         "outputs.x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)))
    for case in manifest["cases"]:
        case["files"] = {name: sha256(golden_copy / name) for name in case["files"]}
    write_manifest(golden_copy, manifest)
    run = ["run", "--backend", "refimpl", "--golden-dir", golden_copy, *no_isolate(conformance_cli.commands["run"])]
    with address_space_limit(GIB):
        assert_one_line_error(invoke(conformance_cli, *run, "--case", "m/*"), "case m/tiny", "m/io.safetensors")
        assert_one_line_error(invoke(conformance_cli, *run, "--case", "op/*"), "case op/top-1", "params")


def test_export_and_check_with_malformed_contract_files(golden, tmp_path):
    exported = tmp_path / "exported"
    result = invoke(conformance_cli, "export", exported, "--golden-dir", golden)
    assert result.exit_code == 0, result.output
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    check = ["check", "--outputs", outputs, "--exported", exported, "--golden-dir", golden]
    for text, fragment in [("{", "CONTRACT.json"), ("[" * 5000 + "]" * 5000, "CONTRACT.json"),
                           ('{"contract_version": 1, "dtype": "float32", "cases": [1]}', "malformed"),
                           (b"\xff\xfe", "CONTRACT.json")]:
        contract = exported / "CONTRACT.json"
        contract.write_bytes(text if isinstance(text, bytes) else text.encode())
        with time_limit(10):
            assert_one_line_error(invoke(conformance_cli, *check), fragment)
    report = tmp_path / "old.json"
    report.write_text("[" * 5000 + "]" * 5000)
    result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden, "--compare-to", report,
                    *no_isolate(conformance_cli.commands["run"]))
    assert_one_line_error(result, "--compare-to", "not a JSON file")


def test_fifos_as_contract_or_old_report_do_not_hang(golden, tmp_path):
    exported = tmp_path / "exported"
    assert invoke(conformance_cli, "export", exported, "--golden-dir", golden).exit_code == 0
    (exported / "CONTRACT.json").unlink()
    os.mkfifo(exported / "CONTRACT.json")
    (tmp_path / "outputs").mkdir()
    with time_limit(10):
        result = invoke(conformance_cli, "check", "--outputs", tmp_path / "outputs", "--exported", exported,
                        "--golden-dir", golden)
    assert_one_line_error(result, "CONTRACT.json (not a regular file)")
    os.mkfifo(tmp_path / "old.json")
    with time_limit(10):
        result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden, "--compare-to",
                        tmp_path / "old.json", *no_isolate(conformance_cli.commands["run"]))
    assert_one_line_error(result, "--compare-to", "not a regular file")


@pytest.fixture(scope="module")
def tiny_results(golden):
    """The refimpl backend's results on the tiny golden corpus (what ``--compare-to`` compares with)."""
    from conformance.backends import resolve_backend
    from conformance.runner import run_suite

    return run_suite(resolve_backend("refimpl", {}), read_manifest(golden).cases, golden, "float32", progress=False)


def _old_reports():
    """``--compare-to`` files: report-shaped objects with odd entries, or any JSON at all."""
    numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.just(10**400), st.text(max_size=3), st.none())
    comparison = st.fixed_dictionaries({}, optional={"rel_rms": numbers, "nonfinite": _json_values(),
                                                     "max_abs": numbers, "shape_mismatch": _json_values()})
    comparisons = st.one_of(st.dictionaries(st.sampled_from(["logits", "hidden_states.norm", "output", "x"]),
                                            st.one_of(comparison, _json_values()), max_size=3), _json_values())
    entry = st.fixed_dictionaries(
        {"case_id": st.sampled_from(["m/tiny", "op/top-1", "other"]),
         "status": st.sampled_from(["passed", "failed", "error", "xfailed", "not implemented", "weird"])},
        optional={"comparisons": comparisons, "message": _json_values()})
    report = st.fixed_dictionaries({"meta": st.dictionaries(st.sampled_from(["dtype", "corpus_version", "x"]),
                                                            _json_values(), max_size=3),
                                    "results": st.lists(st.one_of(entry, _json_values()), max_size=4)})
    return st.one_of(report, report, _json_values())


@FUZZ_50
@given(report=_old_reports())
# float(10**400) raised OverflowError in drift._headline_rel_rms, after the whole run, losing its report.
@example(report={"meta": {}, "results": [{"case_id": "m/tiny", "status": "passed",
                                          "comparisons": {"logits": {"rel_rms": 10**400}}}]})
def test_arbitrary_compare_to_reports_are_refused_or_compared(report, tiny_results, tmp_path_factory):
    from conformance.drift import OldReport, compute_drift, drift_lines, load_old_report, mismatch_warnings

    path = tmp_path_factory.mktemp("old") / "old.json"
    path.write_text(json.dumps(report))
    old = refused_or_done(lambda: load_old_report(path), (ConformanceError,))
    if isinstance(old, OldReport):
        drift = refused_or_done(lambda: compute_drift(tiny_results, old, 2.0), ())
        refused_or_done(lambda: drift_lines(drift, old, 2.0) + mismatch_warnings(old, {"dtype": "float32"}), ())


# ---- token ids -----------------------------------------------------------------------------------------------------

class _RaisesOnConversion:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("cannot convert")


def _any_ids(min_dims=0, max_dims=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.matrix([[1, 2]])
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=4)
    integer = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
    other = st.sampled_from([np.float16, np.float32, np.float64, np.complex128, np.bool_, "timedelta64[s]",
                             "datetime64[D]", "U3", "S2"])
    odd = st.sampled_from([None, "hello", b"\x01\x02", 5, 2.5, {"a": 1}, {1, 2}, [[1, 2], [3]], [[1, "a"]],
                           [[2**70]], [[1.5]], [[True]], np.array([[1, 2]], dtype=object), _RaisesOnConversion(),
                           np.ma.masked_array([[1, 2]], mask=[[0, 1]]), np.ma.masked_array([[1, 2]]),
                           np.zeros((1, 2), dtype=[("a", int)]), matrix])
    return st.one_of(hnp.arrays(np.int64, shapes, elements=st.integers(-2, V + 2)), hnp.arrays(integer, shapes),
                     hnp.arrays(other, shapes), odd, st.lists(st.lists(st.integers(-2, V + 2), min_size=1, max_size=3),
                                                              min_size=1, max_size=2))


def _is_valid_ids(ids, ndim: int) -> bool:
    """The documented contract: an unmasked rectangular integer array (not bool, not
    timedelta) of ``ndim`` dimensions, not empty, every id in [0, V)."""
    if np.ma.is_masked(ids) or isinstance(ids, _RaisesOnConversion):
        return False
    try:
        array = np.asarray(ids)
    except ValueError:
        return False
    return (array.ndim == ndim and array.size > 0 and array.dtype.kind in "iu"
            and bool(((array.astype(object) >= 0) & (array.astype(object) < V)).all()))


@FUZZ_50
@given(ids=_any_ids())
# Accepted before: timedelta64 (NumPy counts it as an integer type) and masked entries (the mask was dropped);
# a conversion error escaped as is.
@example(ids=np.array([[1, 2]], dtype="timedelta64[s]"))
@example(ids=np.ma.masked_array([[1, 2]], mask=[[0, 1]]))
@example(ids=_RaisesOnConversion())
def test_token_ids_are_refused_or_run(ids, tiny_model):
    outcome = refused_or_done(lambda: tiny_model(ids), (InputError,))
    if _is_valid_ids(ids, 2):
        assert isinstance(outcome, np.ndarray) and outcome.shape == np.asarray(ids).shape + (V,), outcome
    else:
        assert isinstance(outcome, InputError), f"accepted {ids!r}"


@FUZZ
@given(ids=_any_ids(max_dims=2))
# Before: floats were truncated (1.7 ran as 1), strings parsed ("12" ran as 12), bools ran as 0 / 1, and a ragged
# list or 2**70 escaped as ValueError / OverflowError.
@example(ids=[1.7])
@example(ids=["12"])
@example(ids=[True])
@example(ids=[1, [2]])
@example(ids=[2**70])
def test_generate_prompt_ids_are_refused_or_run(ids, tiny_model):
    outcome = refused_or_done(lambda: greedy_generate(full_forward_next_logits(tiny_model), ids, 1), (InputError,))
    if _is_valid_ids(ids, 1):
        assert not isinstance(outcome, Exception), outcome
        assert outcome.prompt_ids.tolist() == np.asarray(ids).tolist()
    else:
        assert isinstance(outcome, InputError), f"accepted {ids!r}"


def test_generate_refuses_prompt_ids_beyond_the_vocabulary_by_name(generate_copy):
    # The word-level tokenizer gives ids up to 5; a vocabulary of 4 leaves 'b' (4) and 'c' (5) without embedding.
    config = dict(TINY_QWEN3, vocab_size=4)
    write_checkpoint(generate_copy, config)
    result = invoke(refimpl.cli.cli, "generate", generate_copy, "--prompt", "hi c", "--max-new-tokens", "1")
    assert_one_line_error(result, "token id 5", "'c'", "vocab_size 4")


def test_very_long_sequences_are_refused_before_allocating(tiny_checkpoint):
    # refimpl/masks.py allocated a (T, T) bool mask (37 GiB) and NumPy raised MemoryError.
    code = ("import numpy as np, refimpl\n"
            f"m = refimpl.from_pretrained({str(tiny_checkpoint)!r})\n"
            "try:\n    m(np.zeros((1, 200000), np.int64))\n"
            "except Exception as e:\n    print(type(e).__name__, isinstance(e, refimpl.RefimplError), e)\n")
    proc = run_process(["-c", code], limit_bytes=2 * GIB, timeout=60)
    assert proc.stdout.split()[:2] == ["InputError", "True"], proc.stdout + proc.stderr[-500:]
    assert "one layer's attention scores" in proc.stdout and "of memory available" in proc.stdout


def test_sequences_whose_attention_cannot_fit_in_memory_are_refused_before_allocating(tmp_path):
    # One layer's (B, H, T, T) scores need 2 * 20000**2 * 8 bytes = 6 GiB.
    model = refimpl.from_pretrained(write_checkpoint(tmp_path / "c", dict(TINY_QWEN3, max_position_embeddings=1 << 20)))
    with address_space_limit(GIB):
        outcome = refused_or_done(lambda: model(np.zeros((1, 20_000), np.int64)), (InputError,))
    assert isinstance(outcome, InputError), outcome
    assert re.search(r"attention scores .* need 6\.0 GiB, more than the [0-9.]+ GiB of memory available", str(outcome))


def test_long_sequences_that_fit_still_run(tiny_checkpoint):
    # A length beyond 64 MiB of scores (T = 3000: 2 * 3000**2 * 8 bytes = 137 MiB) within the memory there is.
    model = refimpl.from_pretrained(tiny_checkpoint)
    from refimpl.model import available_memory

    if (available_memory() or 0) < 2 * GIB:
        pytest.skip("less than 2 GiB of memory available")
    assert model(np.zeros((1, 3000), np.int64)).shape == (1, 3000, V)


# ---- skip and xfail files --------------------------------------------------------------------------------------------

#: tests/fuzz_corpus/expectations/<file>: (option, fragment of the one error line).
EXPECTATIONS_CORPUS = {
    "binary-garbage.txt": ("--skip-file", "cannot read"),
    "glob-with-space.txt": ("--skip-file", "glob-with-space.txt:2:"),
    "unclosed-bracket.txt": ("--skip-file", "no ']' closes"),
    "xfail-without-reason.txt": ("--xfail-file", "has no reason"),
}


@pytest.mark.parametrize("name", sorted(EXPECTATIONS_CORPUS))
def test_corpus_expectation_file_is_one_error_line(name, golden):
    option, fragment = EXPECTATIONS_CORPUS[name]
    with time_limit(10):
        result = invoke(conformance_cli, "run", "--backend", "refimpl", "--golden-dir", golden,
                        option, CORPUS / "expectations" / name)
    assert_one_line_error(result, name, fragment)


@pytest.mark.parametrize("line,fragment", [
    ("m/" + "a" * 5000, "glob of 5002 characters"),
    ("[" * 200_000, "characters"),
    ("m/" + "[" * 900, "no ']' closes"),
    ("*a" * 400 + "[", "no ']' closes"),
])
def test_long_and_pathological_glob_lines_are_refused_fast(line, fragment, tmp_path):
    path = tmp_path / "skips.txt"
    path.write_text(f"{line}  # reason\n")
    with time_limit(2):
        with pytest.raises(ExpectationError, match=re.escape(fragment)):
            parse_file(path, reason_required=True)


@FUZZ_50
@given(content=st.one_of(st.binary(max_size=300), st.lists(st.text(max_size=60), max_size=8).map("\n".join)))
# fnmatch rescans the rest of the glob for each unclosed '[': this line took minutes.
@example(content="[" * 100_000)
def test_arbitrary_expectation_files_are_refused_or_read(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "file.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    for required in (False, True):
        entries = refused_or_done(lambda: parse_file(path, reason_required=required), (ExpectationError,), seconds=5)
        if not isinstance(entries, Exception):
            # What run does with the entries: match every case id against every glob.
            refused_or_done(lambda: Expectations(skips=entries).unmatched(["m/tiny", "op/top-1", "x" * 300]), (),
                            seconds=5)
            for entry in entries:
                assert entry.pattern and len(entry.pattern.split()) == 1 and (entry.reason or not required)
                assert entry.pattern in (content if isinstance(content, str) else content.decode("utf-8"))


# ---- whole processes under an address-space cap ---------------------------------------------------------------------

def test_processes_with_huge_declared_shapes_end_in_one_error_line(generate_copy, golden_copy):
    # A safetensors header declaring 10**12 elements, and a config whose sizes reach MAX_SIZE: one error line each,
    # never an allocation, in processes that could not allocate 4 GiB anyway.
    shutil.copy(CORPUS / "safetensors/huge-shape.safetensors", generate_copy / "model.safetensors")
    proc = run_process(["-m", "refimpl.cli", "generate", str(generate_copy), "--prompt", "hi"])
    assert_process_one_line_error(proc, "needs 4000000000000")
    write_checkpoint(generate_copy)
    huge = dict(TINY_QWEN3, vocab_size=1 << 24, hidden_size=1 << 24, intermediate_size=1 << 24, head_dim=1 << 20)
    (generate_copy / "config.json").write_text(json.dumps(huge))
    proc = run_process(["-m", "refimpl.cli", "generate", str(generate_copy), "--prompt", "hi"])
    assert_process_one_line_error(proc, "shape")
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    (golden_copy / "m/io.safetensors").write_bytes(safetensors_bytes(
        {"input_ids": {"dtype": "I64", "shape": [10**6, 10**6], "data_offsets": [0, 8]}}, bytes(8)))
    manifest["cases"][0]["files"]["m/io.safetensors"] = sha256(golden_copy / "m/io.safetensors")
    write_manifest(golden_copy, manifest)
    proc = run_process(["-m", "conformance", "run", "--backend", "refimpl", "--golden-dir", str(golden_copy),
                        *no_isolate(conformance_cli.commands["run"])])
    assert_process_one_line_error(proc, "case m/tiny", "m/io.safetensors")


# ---- the corpus folder ----------------------------------------------------------------------------------------------

def test_the_corpus_is_small_and_every_file_is_described_and_used():
    files = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.is_file() and p.name != "README.md")
    assert sum((CORPUS / f).stat().st_size for f in files) < 200_000
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    used = ({f"config/{n}" for n in [*CONFIG_CORPUS, *CONFIG_CORPUS_XFAIL]}
            | {f"safetensors/{n}" for n in [*SAFETENSORS_CORPUS, *SAFETENSORS_CORPUS_XFAIL]}
            | {f"manifest/{n}" for n in MANIFEST_CORPUS} | {f"expectations/{n}" for n in EXPECTATIONS_CORPUS})
    assert set(files) == used
    for name in files:
        assert f"`{name}`" in readme, f"{name} is not described in tests/fuzz_corpus/README.md"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
