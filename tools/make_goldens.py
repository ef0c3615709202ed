"""Write the golden corpus under golden/ from the reference, deterministically.

Each model-level case is a tiny Hugging Face-format checkpoint with random weights
drawn from a fixed seed (config.json + model.safetensors, float32 tensors) plus
``io.safetensors`` with the input ids and the expected float64 outputs of
``refimpl`` (logits and the named per-layer hidden states). A scenario case
(``docs/scenarios.md``) is a schedule of prefill / decode / rollback steps on a
checkpoint (a model case's, or its own) plus ``steps.safetensors`` with each step's
token ids and expected logits: one full float64 forward of each row alone over its
real tokens so far. ``golden/MANIFEST.json`` lists every case with its seed, config
summary, tolerance class and the sha256 of every file.

The error model (``docs/tolerances.md``): every case is also run through the reference
in float32, float16 and bfloat16, as the ``refimpl`` backend runs it (model forward with
taps and MTP drafts, the scenario's incremental replay, the op on inputs cast to the
dtype), and its own error on each compared tensor against the float64 expected output is
written into the manifest entry (``reference_error``: rel RMS and max abs, 3 significant
digits). A dtype the reference refuses (float16 / bfloat16 before it ran in them) is left
out and reported. Elementwise op cases (the kinds with a ULP window: ``op_elementwise``,
``op_rounding``) also store the reference's own result in each of those dtypes,
``outputs.<name>@<dtype>``, for the ULP rule.

Routing guard: every expert set the reference selects (``refimpl.routers.top_k_indices``, in
call order) in float32, float16 and bfloat16 must equal its float64 run's. A case whose
low-precision run routes a token elsewhere (a near-tie of router scores) would record a
reference error made of that one discrete flip, and so a bound many times the dtype's noise
(``docs/tolerances.md``). Generation then stops, naming the cases, to be given another seed.

Usage:
    python tools/make_goldens.py            # (re)write golden/
    python tools/make_goldens.py --check    # regenerate in memory and compare

``--check`` fails when a stored weight, input or config differs bit for bit from
the regenerated one, when an expected output differs by more than
CHECK_REL_RMS (BLAS summation order differs between machines, so outputs are not
byte-compared), when a recorded reference error differs by more than a factor
CHECK_REFERENCE_FACTOR (its float32 / low-precision rounding depends on the machine's
summation order too; on one machine it is regenerated bit for bit), or when a file does
not match its manifest hash.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

try:
    import numpy as np
    from safetensors.numpy import load, save

    import refimpl
    from conformance.backends.refimpl_backend import RefimplModel
    from conformance.compare import compare
    from conformance.manifest import ScenarioStep, check_schedule
    from conformance.runner import (
        CaseResult, Status, backend_tensors, cast_input, judge, judge_scenario, op_outputs, replay,
    )
    from conformance.tolerances import REFERENCE_DTYPES, get_tolerance
    from refimpl.errors import RefimplError
    from golden_cases import JSON_NULL, ModelCase, OpCase, all_cases
    from golden_cases.common import ScenarioCase
except ImportError as exc:
    sys.exit(f"make_goldens: {exc}; install the project first: pip install -e . (see README.md)")

GENERATOR_VERSION = 1
#: Bumped whenever cases are added, removed or changed.
CORPUS_VERSION = "0.12.0"
#: Largest relative RMS difference allowed between stored and regenerated outputs.
CHECK_REL_RMS = 1e-12
#: Largest factor allowed between a stored and a regenerated reference error (either way).
CHECK_REFERENCE_FACTOR = 2.0
#: Significant digits of a recorded reference error.
REFERENCE_DIGITS = 3


CASES = all_cases()


def _clean_config(config: dict) -> dict:
    """config.json's content: keys set to None left out, keys set to ``JSON_NULL`` written as null."""
    return {k: None if v is JSON_NULL else v for k, v in config.items() if v is not None}


def random_weights(case: ModelCase) -> dict[str, np.ndarray]:
    """Random float32 weights for ``case`` from ``np.random.default_rng(seed)``.

    Linear weights ~ N(0, 1/in_features) (the last axis, 3-D expert stacks too), biases
    ~ N(0, 0.04), embeddings ~ N(0, 1), norm weights 1 + 0.2 N(0, 1) (so that a backend using 1 + w, or ignoring w, is caught),
    unless the architecture's ``weight_init`` draws the tensor itself; then
    ``case.weight_scales`` multipliers.
    Tensors are drawn in sorted-name order so the stream is fixed.
    """
    raw = _clean_config(case.config)
    arch = refimpl.registry.get_architecture(raw)
    config = arch.config_class.from_dict(raw)
    shapes = arch.weight_shapes(config)
    if case.mtp:
        # The multi-token-prediction depths' tensors, drawn in the same sorted stream.
        shapes = {**shapes, **arch.mtp.weight_shapes(config)}
    rng = np.random.default_rng(case.seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        custom = arch.weight_init(name, shape, rng) if arch.weight_init is not None else None
        if custom is not None:
            w = np.asarray(custom, dtype=np.float64)
        elif name.endswith(".bias"):
            w = 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        for key, scale in case.weight_scales.items():
            if key in name:
                w = w * scale
        weights[name] = w.astype(np.float32)
    return weights


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_checkpoint(case, scratch: Path) -> tuple[Path, dict[str, bytes]]:
    """The checkpoint of a model case (or of a scenario with its own config): written under
    ``scratch/<case id>/checkpoint`` and returned as ``(that folder, {relative path: bytes})``."""
    config = _clean_config(case.config)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    weights = random_weights(case)
    if case.checkpoint_layout is not None:
        # The published layout: renamed tensors, copies and unread extras (ModelCase.checkpoint_layout).
        stored = case.checkpoint_layout(weights, np.random.default_rng(case.seed + 20_000))
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in stored.items()}
    model_bytes = save(weights, metadata={"format": "pt"})
    ckpt = scratch / case.case_id / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_bytes(config_bytes)
    (ckpt / "model.safetensors").write_bytes(model_bytes)
    return ckpt, {f"{case.case_id}/checkpoint/config.json": config_bytes,
                  f"{case.case_id}/checkpoint/model.safetensors": model_bytes}


def build_case(case: ModelCase, scratch: Path) -> dict[str, bytes]:
    """All files of one case, as ``{relative path: bytes}`` (paths relative to golden/)."""
    ckpt, checkpoint_files = build_checkpoint(case, scratch)
    config = _clean_config(case.config)

    rng = np.random.default_rng(case.seed + 10_000)
    if case.make_input_ids is not None:
        input_ids = np.asarray(case.make_input_ids(rng, case.batch, case.seq), dtype=np.int64)
    else:
        input_ids = rng.integers(0, config["vocab_size"], size=(case.batch, case.seq), dtype=np.int64)
    out = refimpl.from_pretrained(ckpt, dtype=np.float64).forward(
        input_ids, return_hidden_states=True, return_mtp_logits=case.mtp)
    tensors = {"input_ids": input_ids, "logits": out.logits}
    tensors.update({f"hidden_states.{k}": v for k, v in out.hidden_states.items()})
    tensors.update({f"mtp_logits.{k}": v for k, v in enumerate(out.mtp_logits or [], start=1)})
    # safetensors.numpy.save writes a non-contiguous array's buffer in memory order, silently.
    tensors = {k: np.array(v, order="C") for k, v in tensors.items()}
    provenance = json.dumps(
        {"case_id": case.case_id, "seed": case.seed, "generator_version": GENERATOR_VERSION,
         "numpy_version": np.__version__, "refimpl_version": refimpl.__version__},
        sort_keys=True,
    )
    # One metadata key only: safetensors writes several keys in hash order, not reproducibly.
    io_bytes = save(tensors, metadata={"provenance": provenance})
    expected = {k[len("hidden_states."):] if k.startswith("hidden_states.") else k: v
                for k, v in tensors.items() if k != "input_ids"}
    errors = _guard_routing(case.case_id, lambda dtype: _model_errors(ckpt, input_ids, expected, dtype,
                                                                       case.tolerance_class))
    REFERENCE_ERRORS[case.case_id] = _recorded(errors, case.case_id)
    return {**checkpoint_files, f"{case.case_id}/io.safetensors": io_bytes}


#: ``{case id: reference_error entry}`` of the cases built so far (read by the manifest entries).
REFERENCE_ERRORS: dict[str, dict] = {}
#: ``{dtype: [case ids]}`` of the cases whose reference run the dtype refused.
REFUSED: dict[str, list[str]] = {}
#: ``{case id: {dtype: tokens routed elsewhere than in float64}}`` (the routing guard; must stay empty).
ROUTING_FLIPS: dict[str, dict[str, int]] = {}


@contextlib.contextmanager
def routing_choices():
    """Record every expert set ``refimpl.routers.top_k_indices`` returns, as ``(N, k)`` sorted
    index rows, in call order (every router of refimpl selects through it)."""
    import refimpl.routers as routers

    calls: list[np.ndarray] = []
    select = routers.top_k_indices

    def recording(scores, top_k):
        chosen = select(scores, top_k)
        calls.append(np.sort(chosen, axis=-1))
        return chosen

    routers.top_k_indices = recording
    try:
        yield calls
    finally:
        routers.top_k_indices = select


def routing_flips(float64_calls: list, calls: list) -> int:
    """Tokens whose expert set differs between two recordings of the same run (every token of a
    call when the call sequences differ in length or shape)."""
    if len(calls) != len(float64_calls):
        return sum(len(c) for c in float64_calls) or 1
    flips = 0
    for a, b in zip(float64_calls, calls):
        flips += len(a) if a.shape != b.shape else int((a != b).any(axis=-1).sum())
    return flips


def _guard_routing(case_id: str, run) -> dict:
    """Run ``run(dtype)`` in float64 and in each of REFERENCE_DTYPES, recording routing; note the
    dtypes whose expert sets differ from float64's in ROUTING_FLIPS. Returns ``{dtype: run(dtype)}``."""
    with routing_choices() as float64_calls:
        run("float64")
    results = {}
    for dtype in REFERENCE_DTYPES:
        with routing_choices() as calls:
            results[dtype] = run(dtype)
        flips = routing_flips(float64_calls, calls) if results[dtype] is not None else 0
        if flips:
            ROUTING_FLIPS.setdefault(case_id, {})[dtype] = flips
    return results


def _reference_model(ckpt: Path, dtype: str):
    """The reference loaded in ``dtype``, as the ``refimpl`` backend loads it."""
    return RefimplModel(refimpl.from_pretrained(ckpt, dtype=dtype))


def _model_errors(ckpt: Path, input_ids, expected: dict, dtype: str, tolerance_class: str):
    """The reference's comparisons in ``dtype`` for a model case (``judge``'s tensors and order),
    or None when the reference refuses the dtype."""
    try:
        actual = backend_tensors(_reference_model(ckpt, dtype).run(input_ids))
    except RefimplError as exc:
        return _refused(dtype, exc)
    result = judge(CaseResult("", dtype, Status.ERROR), actual, expected, get_tolerance(tolerance_class, dtype))
    if set(result.comparisons) != set(expected):
        raise RuntimeError(f"the reference in {dtype} returned {sorted(result.comparisons)}, the case holds "
                           f"{sorted(expected)}")
    return result.comparisons


def _refused(dtype: str, exc: RefimplError):
    """None for a low-precision dtype the reference does not run in (yet); float32 must run."""
    if dtype == "float32":
        raise exc
    return None


def _recorded(errors: dict, case_id: str) -> dict:
    """The manifest's ``reference_error`` from ``{dtype: {name: Comparison} or None}``."""
    entry = {}
    for dtype, comparisons in errors.items():
        if comparisons is None:
            REFUSED.setdefault(dtype, []).append(case_id)
            continue
        entry[dtype] = {name: {"rel_rms": _significant(c.rel_rms), "max_abs": _significant(c.max_abs)}
                        for name, c in sorted(comparisons.items())}
        bad = [name for name, c in comparisons.items() if c.nonfinite or c.shape_mismatch]
        if bad:
            raise RuntimeError(f"{case_id}: the reference in {dtype} gives NaN/Inf or a wrong shape at {bad}")
    return entry


def _significant(value: float) -> float:
    return float(f"{value:.{REFERENCE_DIGITS}g}")


def _model_case(case_id: str) -> ModelCase:
    """The model case ``case_id`` of the generator (a scenario's ``checkpoint_of``)."""
    found = [c for c in CASES if isinstance(c, ModelCase) and c.case_id == case_id]
    if not found:
        raise ValueError(f"checkpoint_of '{case_id}' names no model case of the generator")
    return found[0]


def scenario_tokens(case: ScenarioCase, config, rng, index: int, step: dict, history: list) -> np.ndarray:
    """The ``(B, n)`` token ids of one prefill or decode step (``ScenarioCase.make_tokens`` or uniform)."""
    shape = (case.batch, step["num_tokens"])
    if case.make_tokens is not None:
        ids = case.make_tokens(rng, index, shape, config.vocab_size, [np.asarray(h, dtype=np.int64) for h in history])
    else:
        ids = rng.integers(0, config.vocab_size, size=shape, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != shape:
        raise ValueError(f"{case.case_id}: make_tokens returned shape {ids.shape} for step {index}, expected {shape}")
    return ids


def scenario_steps(case: ScenarioCase, model) -> dict[str, np.ndarray]:
    """The data file's tensors of a scenario: per prefill / decode step i, ``steps.{i}.input_ids``
    and the expected ``steps.{i}.logits`` (plus ``steps.0.attention_mask`` for a padded prompt).

    The expected logits of a step are, for each row alone, the last rows of ONE FULL FORWARD
    (``refimpl.Model.__call__``, float64, no cache, no padding) over that row's real tokens so
    far (rolled-back tokens removed); pad slots hold NaN (no expected value).
    """
    check_schedule(list(case.schedule), case.case_id)
    rng = np.random.default_rng(case.seed)
    history = [[] for _ in range(case.batch)]
    pads = case.left_padding or (0,) * case.batch
    tensors = {}
    for index, step in enumerate(case.schedule):
        n = step["num_tokens"]
        if step["op"] == "rollback":
            history = [h[:len(h) - n] for h in history]
            continue
        ids = scenario_tokens(case, model.config, rng, index, step, history)
        first = pads if step["op"] == "prefill" else (0,) * case.batch
        if max(first) >= n:
            raise ValueError(f"{case.case_id}: left padding {first} leaves a row of the {n}-token prompt empty")
        logits = np.full((case.batch, n, model.config.vocab_size), np.nan)
        for row in range(case.batch):
            history[row] = history[row] + [int(t) for t in ids[row, first[row]:]]
            real = n - first[row]
            logits[row, first[row]:] = model(np.asarray(history[row], dtype=np.int64)[None])[0, -real:]
        tensors[f"steps.{index}.input_ids"] = ids
        tensors[f"steps.{index}.logits"] = logits
        if step["op"] == "prefill" and any(pads):
            tensors["steps.0.attention_mask"] = (np.arange(n)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
    return tensors


def build_scenario_case(case: ScenarioCase, scratch: Path) -> tuple[str, dict[str, bytes]]:
    """``(checkpoint folder, {relative path: bytes})`` of a scenario: its checkpoint's files (its
    own, or those of the model case ``checkpoint_of``, byte for byte) and ``steps.safetensors``."""
    owner = _model_case(case.checkpoint_of) if case.checkpoint_of is not None else case
    ckpt, files = build_checkpoint(owner, scratch)
    model = refimpl.from_pretrained(ckpt, dtype=np.float64)
    tensors = {k: np.array(v, order="C") for k, v in scenario_steps(case, model).items()}
    provenance = json.dumps(
        {"case_id": case.case_id, "seed": case.seed, "generator_version": GENERATOR_VERSION,
         "numpy_version": np.__version__, "refimpl_version": refimpl.__version__},
        sort_keys=True,
    )
    files[f"{case.case_id}/steps.safetensors"] = save(tensors, metadata={"provenance": provenance})
    steps = _scenario_steps(case, tensors)
    errors = _guard_routing(case.case_id, lambda dtype: _scenario_errors(ckpt, steps, dtype, case.tolerance_class))
    REFERENCE_ERRORS[case.case_id] = _recorded(errors, case.case_id)
    return f"{owner.case_id}/checkpoint", files


def _scenario_steps(case: ScenarioCase, tensors: dict) -> list:
    """The :class:`ScenarioStep` list the runner reads from the data file, built from ``tensors``."""
    steps, before = [], 0
    for index, entry in enumerate(case.schedule):
        op, n = entry["op"], entry["num_tokens"]
        if op == "rollback":
            steps.append(ScenarioStep(index, op, n, before))
            before -= n
            continue
        mask = tensors.get("steps.0.attention_mask") if index == 0 else None
        steps.append(ScenarioStep(index, op, n, before, tensors[f"steps.{index}.input_ids"], mask,
                                  tensors[f"steps.{index}.logits"]))
        before += n
    return steps


def _scenario_errors(ckpt: Path, steps: list, dtype: str, tolerance_class: str):
    """The reference's step comparisons in ``dtype``: its own prefill / decode / rollback replay, as
    the ``refimpl`` backend runs a scenario; None when the reference refuses the dtype."""
    try:
        actual, exc, at = replay(_reference_model(ckpt, dtype), steps)
        if exc is not None:
            raise exc
    except RefimplError as exc:
        return _refused(dtype, exc)
    result = judge_scenario(CaseResult("", dtype, Status.ERROR), actual, steps, get_tolerance(tolerance_class, dtype))
    return result.comparisons


def scenario_manifest_entry(case: ScenarioCase, checkpoint: str, files: dict[str, bytes]) -> dict:
    owner = _model_case(case.checkpoint_of) if case.checkpoint_of is not None else case
    reused = {"checkpoint_of": case.checkpoint_of} if case.checkpoint_of is not None else {}
    return {
        **reused,
        "id": case.case_id, "level": "scenario", "architecture": owner.config["architectures"][0],
        "description": case.description, "seed": case.seed, "tolerance_class": case.tolerance_class,
        "config_summary": config_summary(_clean_config(owner.config)),
        "batch": case.batch, "schedule": [dict(step) for step in case.schedule],
        "checkpoint": checkpoint, "data": f"{case.case_id}/steps.safetensors",
        "files": {path: sha256_bytes(data) for path, data in sorted(files.items())},
        **_reference_entry(case.case_id),
    }


def _float64_outputs(value, names) -> dict[str, np.ndarray]:
    """An op's outputs as float64 arrays; integer outputs (a router's ``selected``) stay int64."""

    def stored(v):
        v = np.asarray(v)
        return v.astype(np.int64) if v.dtype.kind in "iu" else v.astype(np.float64)

    if isinstance(value, dict):
        return {k: stored(v) for k, v in value.items()}
    return {names[0]: stored(value)}


def _op_errors(case: OpCase, inputs: dict, expected: dict, dtype: str):
    """``(comparisons, outputs)`` of the reference's op on the inputs cast to ``dtype`` (as the
    runner casts them) against the float64 expected outputs, integer outputs left out; None when
    the reference refuses the dtype."""
    from refimpl.ops import OPS

    op = OPS[case.op]
    try:
        outputs = op_outputs(op.function(**{k: cast_input(v, dtype) for k, v in inputs.items()}, **case.params),
                             op.outputs)
    except RefimplError as exc:
        return _refused(dtype, exc)
    comparisons = {name: compare(outputs[name], expected[name]) for name in op.outputs
                   if name not in op.integer_outputs}
    return comparisons, outputs


def build_op_case(case: OpCase) -> dict[str, bytes]:
    """The data file of one op case: inputs, float64 expected outputs (int64 integer outputs), params in
    metadata; elementwise cases also the reference's result in each lower dtype (``<name>@<dtype>``)."""
    from refimpl.ops import OPS

    op = OPS[case.op]
    inputs = case.make_inputs(np.random.default_rng(case.seed))
    for name, array in inputs.items():
        want = np.int64 if name in op.integer_inputs else np.float64
        if array.dtype != want:
            raise TypeError(f"{case.case_id}: input '{name}' is {array.dtype}, the generator stores {np.dtype(want)}")
    outputs = _float64_outputs(op.function(**inputs, **case.params), op.outputs)
    errors = {}
    for dtype, measured in _guard_routing(case.case_id, lambda d: _op_errors(case, inputs, outputs, d)).items():
        errors[dtype] = None if measured is None else measured[0]
        if measured is not None and get_tolerance(case.tolerance_class, dtype).ulp is not None:
            # Stored as float64: every value of the lower dtype is exactly representable.
            outputs.update({f"{k}@{dtype}": v for k, v in measured[1].items() if k not in op.integer_outputs})
    REFERENCE_ERRORS[case.case_id] = _recorded(errors, case.case_id)
    tensors = {f"inputs.{k}": v for k, v in inputs.items()}
    tensors.update({f"outputs.{k}": v for k, v in outputs.items()})
    # safetensors.numpy.save writes a non-contiguous array's buffer in memory order, silently.
    tensors = {k: np.array(v, order="C") for k, v in tensors.items()}
    meta = json.dumps(
        {"op": case.op, "params": case.params,
         "provenance": {"case_id": case.case_id, "seed": case.seed, "generator_version": GENERATOR_VERSION,
                        "numpy_version": np.__version__, "refimpl_version": refimpl.__version__}},
        sort_keys=True,
    )
    return {f"{case.case_id}/io.safetensors": save(tensors, metadata={"case": meta})}


def op_manifest_entry(case: OpCase, files: dict[str, bytes]) -> dict:
    tensors = load(files[f"{case.case_id}/io.safetensors"])
    return {
        "id": case.case_id, "level": "op", "op": case.op, "description": case.description, "seed": case.seed,
        "tolerance_class": case.tolerance_class, "data": f"{case.case_id}/io.safetensors",
        "inputs": {k[len("inputs."):]: list(v.shape) for k, v in sorted(tensors.items()) if k.startswith("inputs.")},
        "files": {path: sha256_bytes(data) for path, data in sorted(files.items())},
        **_reference_entry(case.case_id),
    }


def _reference_entry(case_id: str) -> dict:
    """``{"reference_error": ...}`` of a built case, or ``{}`` when no dtype could be measured."""
    recorded = REFERENCE_ERRORS.get(case_id)
    return {"reference_error": recorded} if recorded else {}


def config_summary(config: dict) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "attention_bias",
            "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "sliding_window_pattern",
            "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "no_rope_layers",
            "no_rope_layer_interval", "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq")
    return {k: config[k] for k in keys if k in config}


def manifest_entry(case: ModelCase, files: dict[str, bytes]) -> dict:
    # Cases with multi-token-prediction outputs say how many depths their data file holds.
    depths = sum(name.startswith("mtp_logits.") for name in load(files[f"{case.case_id}/io.safetensors"]))
    mtp = {"mtp_depths": depths} if case.mtp else {}
    return {
        **mtp,
        "id": case.case_id, "level": "model", "architecture": case.config["architectures"][0],
        "description": case.description, "seed": case.seed, "tolerance_class": case.tolerance_class,
        "config_summary": config_summary(_clean_config(case.config)),
        "input_shape": [case.batch, case.seq],
        "checkpoint": f"{case.case_id}/checkpoint", "data": f"{case.case_id}/io.safetensors",
        "files": {path: sha256_bytes(data) for path, data in sorted(files.items())},
        **_reference_entry(case.case_id),
    }


def generate(scratch: Path, cases: list | None = None) -> tuple[dict, dict[str, bytes]]:
    """Build every case (or ``cases``); return the manifest and all files (including MANIFEST.json)."""
    all_files: dict[str, bytes] = {}
    entries = []
    for case in CASES if cases is None else cases:
        if isinstance(case, OpCase):
            files = build_op_case(case)
            entries.append(op_manifest_entry(case, files))
        elif isinstance(case, ScenarioCase):
            checkpoint, files = build_scenario_case(case, scratch)
            entries.append(scenario_manifest_entry(case, checkpoint, files))
        else:
            files = build_case(case, scratch)
            entries.append(manifest_entry(case, files))
        all_files.update(files)
    manifest = {"corpus_version": CORPUS_VERSION, "generator": "tools/make_goldens.py",
                "generator_version": GENERATOR_VERSION, "cases": entries}
    all_files["MANIFEST.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return manifest, all_files


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    """Relative RMS difference over finite positions (NaN if either side is all non-finite there)."""
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.linalg.norm((a - b)[finite]) / max(np.linalg.norm(b[finite]), np.finfo(np.float64).tiny))


def _case_metadata(data: bytes) -> dict:
    """The ``case`` metadata of an op data file without its provenance (versions vary by machine)."""
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    case = json.loads(meta["case"]) if "case" in meta else {}
    case.pop("provenance", None)
    return case


def _is_output(name: str, output_keys: bool) -> bool:
    """Expected outputs are compared by tolerance; inputs (token ids, a scenario's ids and
    attention mask) and weights bit for bit."""
    is_input = name == "input_ids" or name.startswith("inputs.") or (
        name.startswith("steps.") and name.endswith((".input_ids", ".attention_mask")))
    return output_keys and (name.startswith("outputs.") or not is_input)


def _compare_tensor_file(path: str, stored: bytes, fresh: bytes, output_keys: bool) -> list[str]:
    """Differences between two safetensors files: bitwise, except outputs by tolerance."""
    old, new = load(stored), load(fresh)
    problems = []
    if _case_metadata(stored) != _case_metadata(fresh):
        problems.append(f"{path}: op or params differ: stored {_case_metadata(stored)}, regenerated {_case_metadata(fresh)}")
    if set(old) != set(new):
        problems.append(f"{path}: tensor names differ: {sorted(set(old) ^ set(new))}")
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        is_output = _is_output(name, output_keys)
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{path}:{name}: stored {a.dtype}{a.shape}, regenerated {b.dtype}{b.shape}")
        elif is_output and not np.array_equal(np.isfinite(a), np.isfinite(b)):
            problems.append(f"{path}:{name}: NaN/Inf positions differ from the regenerated output")
        elif is_output and not _rel_rms(a, b) <= CHECK_REL_RMS:
            problems.append(f"{path}:{name}: expected output differs, rel RMS {_rel_rms(a, b):.3e} > {CHECK_REL_RMS}")
        elif not is_output and a.tobytes() != b.tobytes():
            problems.append(f"{path}:{name}: differs bit for bit from the regenerated tensor")
    return problems


def check(golden: Path, files: dict[str, bytes]) -> list[str]:
    """Compare the stored corpus with freshly generated ``files``; return the problems."""
    problems = []
    try:
        stored_manifest = json.loads((golden / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return [f"{golden / 'MANIFEST.json'} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{golden / 'MANIFEST.json'} cannot be read as JSON ({exc})"]
    if not isinstance(stored_manifest, dict):
        return [f"{golden / 'MANIFEST.json'} is not a JSON object"]
    for path, fresh in sorted(files.items()):
        target = golden / path
        if path == "MANIFEST.json":
            continue
        if not target.is_file():
            problems.append(f"{path}: missing from {golden}")
            continue
        stored = target.read_bytes()
        if path.endswith(".safetensors"):
            problems += _compare_tensor_file(path, stored, fresh,
                                             output_keys=path.endswith(("io.safetensors", "steps.safetensors")))
        elif stored != fresh:
            problems.append(f"{path}: differs from the regenerated file")
    stored_hashes = {p: h for c in stored_manifest.get("cases", []) for p, h in c.get("files", {}).items()}
    for path, digest in sorted(stored_hashes.items()):
        if (golden / path).is_file() and sha256_bytes((golden / path).read_bytes()) != digest:
            problems.append(f"{path}: sha256 does not match MANIFEST.json")
    fresh_ids = [c.case_id for c in CASES]
    stored_ids = [c.get("id") for c in stored_manifest.get("cases", [])]
    if fresh_ids != stored_ids:
        problems.append(f"MANIFEST.json lists cases {stored_ids}, the generator makes {fresh_ids}")
        return problems
    # Everything but the hashes (which follow the files, checked above) must be regenerated exactly.
    fresh_manifest = json.loads(files["MANIFEST.json"])
    for key in ("corpus_version", "generator", "generator_version"):
        if stored_manifest.get(key) != fresh_manifest[key]:
            problems.append(f"MANIFEST.json: {key} is {stored_manifest.get(key)!r}, the generator writes {fresh_manifest[key]!r}")
    for old, new in zip(stored_manifest["cases"], fresh_manifest["cases"]):
        problems += _compare_reference_errors(new["id"], old.get("reference_error", {}),
                                              new.get("reference_error", {}))
        old, new = ({k: v for k, v in entry.items() if k not in ("files", "reference_error")} for entry in (old, new))
        if old != new:
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            problems.append(f"MANIFEST.json: case {new['id']}: {', '.join(changed)} differ from the generator's")
    return problems


def _compare_reference_errors(case_id: str, stored: dict, fresh: dict) -> list[str]:
    """Differences between two ``reference_error`` records: the same dtypes and tensors, each number
    within a factor :data:`CHECK_REFERENCE_FACTOR` of the other (both 0, or neither)."""
    where = f"MANIFEST.json: case {case_id}: reference_error"
    if not isinstance(stored, dict) or set(stored) != set(fresh):
        return [f"{where}: dtypes {sorted(stored) if isinstance(stored, dict) else stored!r}, the generator "
                f"measures {sorted(fresh)}"]
    problems = []
    for dtype, outputs in fresh.items():
        if not isinstance(stored[dtype], dict) or set(stored[dtype]) != set(outputs):
            problems.append(f"{where}.{dtype}: tensors differ from the generator's")
            continue
        for name, numbers in outputs.items():
            for key, value in numbers.items():
                old = stored[dtype][name].get(key) if isinstance(stored[dtype][name], dict) else None
                if not isinstance(old, (int, float)) or (old == 0) != (value == 0) or (
                        value and not 1 / CHECK_REFERENCE_FACTOR <= old / value <= CHECK_REFERENCE_FACTOR):
                    problems.append(f"{where}.{dtype}.{name}.{key}: stored {old!r}, regenerated {value!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "golden", help="golden directory (default: golden/)")
    parser.add_argument("--check", action="store_true", help="regenerate in memory and compare with --out")
    parser.add_argument("--only", metavar="GLOB", action="append",
                        help="write only the cases whose id matches (repeatable; a scratch corpus for development, "
                             "its MANIFEST.json lists only those cases); not with --check")
    args = parser.parse_args(argv)
    import fnmatch
    import tempfile

    if args.only and args.check:
        parser.error("--only writes a partial corpus and cannot be combined with --check")
    cases = [c for c in CASES if any(fnmatch.fnmatchcase(c.case_id, g) for g in args.only)] if args.only else CASES
    if not cases:
        parser.error(f"no case id matches {args.only}")
    with tempfile.TemporaryDirectory() as scratch:
        _, files = generate(Path(scratch), cases)
    for dtype, refused in sorted(REFUSED.items()):
        print(f"make_goldens: the reference refused {dtype} on {len(refused)} case(s) (e.g. {refused[0]}): their "
              f"manifest entries record no {dtype} reference error", file=sys.stderr)
    if ROUTING_FLIPS:
        print(f"make_goldens: the reference's low-precision run routes tokens to other experts than its float64 run "
              f"(a near-tie of router scores) in {len(ROUTING_FLIPS)} case(s); give them another seed:", file=sys.stderr)
        for case_id, flips in sorted(ROUTING_FLIPS.items()):
            print(f"  {case_id}: " + ", ".join(f"{n} token(s) in {d}" for d, n in flips.items()), file=sys.stderr)
        return 1
    if args.check:
        problems = check(args.out, files)
        for p in problems:
            print(f"golden check: {p}", file=sys.stderr)
        print(f"golden check: {len(CASES)} cases, {len(problems)} problem(s)")
        return 1 if problems else 0
    for path, data in files.items():
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_bytes(data)
    print(f"wrote {len(cases)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
