"""The MoE / MLA op level: the cases of ``tools/golden_cases/moe_ops.py`` hold the bug-class
probes' hand-computed values, the reference and transformers pass them, a flipped expert is
caught exactly, and the corpus has no routing decision that rounding can flip.

The corpus is generated into a temporary directory (about 2 s), so these tests do not
depend on the committed ``golden/`` being regenerated.
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conformance.cli import cli
from conformance.compare import compare
from conformance.manifest import load_manifest, load_op_data
from conformance.runner import CaseResult, Status, judge_op
from conformance.tolerances import get_tolerance
from conftest import ROOT
from refimpl import ops
from refimpl.errors import ConfigError, RoutingTieWarning, UnknownArchitectureError

ROUTING_OPS = [name for name, op in ops.OPS.items() if op.integer_outputs]


@pytest.fixture(scope="session")
def moe_golden_dir(tmp_path_factory) -> Path:
    """The op cases of ``tools/golden_cases/moe_ops.py``, written by the golden generator."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_goldens
    from golden_cases import moe_ops

    out = tmp_path_factory.mktemp("moe_golden")
    with tempfile.TemporaryDirectory() as scratch:
        _, files = make_goldens.generate(Path(scratch), moe_ops.CASES)
    for path, data in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    return out


def case_data(golden_dir, case_id):
    case = next(c for c in load_manifest(golden_dir) if c.id == case_id)
    return load_op_data(golden_dir, case)


def run(golden_dir, tmp_path, backend, dtype):
    report = tmp_path / f"{backend}-{dtype}.json"
    result = CliRunner().invoke(cli, ["run", "--backend", backend, "--dtype", dtype, "--level", "op",
                                      "--golden-dir", str(golden_dir), "--report", str(report)])
    return result, {r["case_id"]: r for r in json.loads(report.read_text())["results"]}


# -- the probes' values, computed by hand (not by the code under test)

def test_moe01_probe_weights_come_from_unbiased_scores(moe_golden_dir):
    for op in ("sigmoid_group_top_k", "sigmoid_bias_top_k"):
        expected = case_data(moe_golden_dir, f"op/{op}/moe01-probe").expected
        np.testing.assert_array_equal(expected["selected"], [[1, 1, 0, 0]])
        # 0.5 / 0.5 after renormalisation; biased scores 2.5 / 0.6 would give 0.806 / 0.194.
        np.testing.assert_allclose(expected["routing_weights"], [[0.5, 0.5, 0.0, 0.0]], rtol=1e-15)


def test_moe04_probe_weights_are_probabilities(moe_golden_dir):
    expected = case_data(moe_golden_dir, "op/softmax_top_k/moe04-probe").expected
    z = sum(math.exp(v) for v in (2, 1, 0, -1))
    np.testing.assert_allclose(expected["routing_weights"][0], [math.exp(2) / z, math.exp(1) / z, 0, 0], rtol=1e-14)
    np.testing.assert_allclose(expected["routing_weights"][0, :2], [0.644, 0.237], atol=5e-4)


def test_moe05_probe_scales_without_renormalisation(moe_golden_dir):
    expected = case_data(moe_golden_dir, "op/sigmoid_group_top_k/moe05-no-norm-scaled").expected
    np.testing.assert_allclose(expected["routing_weights"][0], [0.75, 0, 0, 0], rtol=1e-14)


def test_group_limit_probe_excludes_the_best_expert(moe_golden_dir):
    data = case_data(moe_golden_dir, "op/sigmoid_group_top_k/group-limit-excludes-best")
    assert int(np.argmax(data.inputs["router_logits"][0])) == 3
    np.testing.assert_array_equal(data.expected["selected"][0], [0, 0, 0, 0, 1, 1, 0, 0])
    # renormalised 0.88 / 0.85, times 2.5
    np.testing.assert_allclose(data.expected["routing_weights"][0, 4:6], [2.5 * 0.88 / 1.73, 2.5 * 0.85 / 1.73],
                               rtol=1e-14)


def test_negative_bias_probe_chooses_only_inside_kept_groups(moe_golden_dir):
    data = case_data(moe_golden_dir, "op/sigmoid_group_top_k/negative-bias-group-fill")
    assert (data.inputs["e_score_correction_bias"] < -1).all()  # every selection score is negative
    chosen_groups = data.expected["selected"].reshape(-1, 4, 2).any(axis=-1).sum(axis=-1)
    assert (chosen_groups <= 2).all()


def _gpt_oss_activation(gate, up, limit, alpha=1.702):
    g = min(gate, limit)
    return (max(-limit, min(up, limit)) + 1) * g / (1 + math.exp(-alpha * g))


@pytest.mark.parametrize("case,limit,pairs", [
    ("act02-probe", 10.0, [[(15.0, 12.0), (-15.0, 3.0)], [(3.0, -12.0), (0.5, 0.5)], [(10.0, 10.0), (11.0, -11.0)]]),
    ("act05-probe", 4.0, [[(6.0, 5.0), (4.5, -5.0)], [(-6.0, 2.0), (2.0, 4.5)]]),
])
def test_clamp_probes(moe_golden_dir, case, limit, pairs):
    data = case_data(moe_golden_dir, f"op/clamped_swiglu_expert/{case}")
    activations = np.array([[_gpt_oss_activation(g, u, limit) for g, u in row] for row in pairs])
    np.testing.assert_allclose(data.expected["output"], activations @ data.inputs["down_proj"], rtol=1e-13)
    if case == "act02-probe":
        assert abs(activations[0, 0] - 110.0) < 1e-5  # (10 + 1) * 10 * sigmoid(17.02)


def test_weight_on_input_differs_from_weight_on_output(moe_golden_dir):
    on_output = case_data(moe_golden_dir, "op/moe_dispatch/weight-on-output")
    on_input = case_data(moe_golden_dir, "op/moe_dispatch/weight-on-input")
    for name in on_output.inputs:
        np.testing.assert_array_equal(on_output.inputs[name], on_input.inputs[name])
    assert compare(on_input.expected["output"], on_output.expected["output"]).rel_rms > 0.1


def test_absorbed_and_literal_mla_cases_agree(moe_golden_dir):
    for literal, absorbed in [("literal-yarn", "absorbed-yarn"), ("literal-mscale-differs", "absorbed-mscale-differs"),
                              ("literal-no-q-lora", "absorbed-no-q-lora")]:
        a = case_data(moe_golden_dir, f"op/mla/{literal}")
        b = case_data(moe_golden_dir, f"op/mla/{absorbed}")
        assert compare(b.expected["output"], a.expected["output"]).rel_rms < 1e-14


# -- format and corpus properties

def test_selected_is_stored_as_int64(moe_golden_dir):
    from safetensors.numpy import load_file

    data = load_file(str(moe_golden_dir / "op/softmax_top_k/renormalised/io.safetensors"))
    assert data["outputs.selected"].dtype == np.int64
    assert data["outputs.routing_weights"].dtype == np.float64


def test_torch_topk_breaks_boundary_ties_differently():
    # Why the corpus has no tie at the selection boundary: the reference keeps the lower
    # index ([0, 1]); torch.topk on the CPU returns [1, 2].
    torch = pytest.importorskip("torch")
    assert torch.topk(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).indices.tolist() == [1, 2]
    with pytest.warns(RoutingTieWarning):
        _, indices = ops.routers.softmax_top_k(np.array([[1.0, 1.0, 1.0, 0.0]]), 2, norm_topk_prob=True)
    assert indices.tolist() == [[0, 1]]


def _low(array, dtype):
    return array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_no_routing_case_flips_when_its_inputs_are_rounded(moe_golden_dir, dtype):
    # Rounding the inputs moves every score a little: no case may sit so close to a
    # decision that this changes the chosen experts (exact ties inside or outside the
    # chosen set are fine: rounding keeps them ties).
    for case in load_manifest(moe_golden_dir):
        if case.op not in ROUTING_OPS:
            continue
        data = load_op_data(moe_golden_dir, case)
        rounded = {k: _low(v, dtype) for k, v in data.inputs.items()}
        got = ops.OPS[case.op].function(**rounded, **data.params)
        np.testing.assert_array_equal(got["selected"], data.expected["selected"], err_msg=case.id)


# -- the suite against the reference and transformers

def test_reference_passes_every_moe_op_case(moe_golden_dir, tmp_path):
    for dtype in ("float64", "float32"):
        result, by_case = run(moe_golden_dir, tmp_path, "refimpl", dtype)
        assert result.exit_code == 0, result.output
        assert {e["status"] for e in by_case.values()} == {"passed"}


#: ops transformers has no code for: Grok 2.5's router and MoE block
NOT_IN_TRANSFORMERS = {"op/soft_capped_softmax_top_k/grok-cap-30", "op/soft_capped_softmax_top_k/top-1-no-cap",
                       "op/moe_block/grok2"}


@pytest.mark.parametrize("dtype", [
    "float64", pytest.param("float32", marks=pytest.mark.slow), pytest.param("float16", marks=pytest.mark.slow),
    pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_transformers_passes_every_moe_op_case(moe_golden_dir, tmp_path, dtype):
    pytest.importorskip("transformers")
    result, by_case = run(moe_golden_dir, tmp_path, "transformers", dtype)
    not_implemented = {c for c, e in by_case.items() if e["status"] == "not implemented"}
    assert not_implemented == NOT_IN_TRANSFORMERS
    assert {e["status"] for c, e in by_case.items() if c not in not_implemented} == {"passed"}, result.output
    if dtype == "float64":
        # float32 islands lifted: agreement to rounding, far inside the 1e-12 bound.
        worst = max(c["rel_rms"] for e in by_case.values() for c in e["comparisons"].values())
        assert worst < 1e-14


# -- the runner's exact comparison of integer outputs

class FlippedSelection:
    """The reference ops run in float32 on any dtype, with softmax_top_k's first token sent to
    the wrong expert in ``selected`` (its weights untouched)."""

    name = "flipped-selection"

    def supports(self, case, dtype):
        return True

    @property
    def ops(self):
        def widened(fn):
            def call(*args, **kwargs):
                cast = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.kind not in "iu" else v)
                        for k, v in kwargs.items()}
                return fn(*args, **cast)

            return call

        table = {name: widened(op.function) for name, op in ops.OPS.items()}

        def flipped(**kwargs):
            out = table["softmax_top_k"](**kwargs)
            selected = out["selected"].copy()
            row = selected[0]
            on, off = int(np.argmax(row == 1)), int(np.argmax(row == 0))
            row[on], row[off] = 0, 1
            return {**out, "selected": selected}

        return {**table, "softmax_top_k": flipped}


def test_judge_op_compares_integer_outputs_exactly():
    expected = {"routing_weights": np.array([[0.6, 0.4, 0.0]]), "selected": np.array([[1.0, 1.0, 0.0]])}
    actual = {"routing_weights": np.array([[0.6, 0.4, 0.0]]), "selected": np.array([[1.0, 0.0, 1.0]])}
    tolerance = get_tolerance("op_routing", "bfloat16")
    result = judge_op(CaseResult("c", "bfloat16", Status.ERROR), actual, expected, tolerance, exact=("selected",))
    assert result.status == Status.FAILED and result.first_divergence == "selected"
    assert "2 of 3 elements differ" in result.message
    result = judge_op(CaseResult("c", "bfloat16", Status.ERROR), {**actual, "selected": expected["selected"]},
                      expected, tolerance, exact=("selected",))
    assert result.status == Status.PASSED


# -- op argument errors

def test_moe_block_op_names_the_unknown_or_dense_architecture():
    x = np.zeros((1, 2, 4))
    with pytest.raises(UnknownArchitectureError, match="Nope"):
        ops.moe_block(x, config={"architectures": ["NopeForCausalLM"]})
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM has no MoE block"):
        ops.moe_block(x, config={"architectures": ["Qwen3ForCausalLM"]})


def test_mla_op_refuses_an_unknown_form():
    with pytest.raises(ConfigError, match="form must be one of"):
        ops.mla(np.zeros((1, 2, 4)), np.zeros((1, 2), np.int64), form="fused", num_attention_heads=1,
                q_lora_rank=None, kv_lora_rank=2, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_interleave=True,
                rms_norm_eps=1e-6, max_position_embeddings=16, attention_bias=False)


def test_moe_dispatch_op_refuses_mismatched_expert_stacks():
    from refimpl.errors import ShapeError

    with pytest.raises(ShapeError, match="different numbers of experts"):
        ops.moe_dispatch(np.zeros((2, 4)), np.ones((2, 1)), np.zeros((2, 1), np.int64), np.zeros((3, 6, 4)),
                         np.zeros((2, 4, 3)))
