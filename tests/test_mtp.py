"""Multi-token prediction: ``refimpl.mtp``, the model API, loading, the golden cases and the suite's MTP plumbing.

Expected values come from independent computations (the formula written out with NumPy,
causality of the draft logits, a recording depth function), never from the code under test.
"""

import json
import subprocess
import sys
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refimpl
from conftest import ROOT
from conformance.backends.base import BackendOutput
from conformance.backends.refimpl_backend import RefimplBackend, RefimplModel
from conformance.errors import ManifestError
from conformance.manifest import load_case_mtp_logits, load_manifest, read_manifest
from conformance.runner import Status, run_case
from refimpl import routers
from refimpl.errors import (
    ConfigError, InputError, MissingWeightsError, RefimplError, ShapeError, UnexpectedWeightsError, WeightShapeError,
)
from refimpl.models import deepseek_v3, glm4_moe, qwen3_next
from refimpl.mtp import MTP_TENSORS, mtp_chain, mtp_layer
from refimpl.ops import OPS

sys.path.insert(0, str(ROOT / "tools"))
from golden_cases import mtp as mtp_cases  # noqa: E402

MODEL_CASES = [c.case_id for c in mtp_cases.CASES if c.case_id.startswith("mtp/")]


@pytest.fixture(scope="module")
def mtp_golden(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp_golden")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_goldens.py"), "--only", "mtp/*", "--only",
                    "op/mtp_layer/*", "--out", str(out)], check=True, capture_output=True)
    return out


def _rms(x, w, eps, offset=0.0):
    return (offset + w) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _weights(rng, m):
    return {"enorm.weight": 1 + 0.2 * rng.standard_normal(m), "hnorm.weight": 1 + 0.2 * rng.standard_normal(m),
            "eh_proj.weight": rng.standard_normal((m, 2 * m)) / np.sqrt(2 * m),
            "shared_head.norm.weight": 1 + 0.2 * rng.standard_normal(m)}


# --- refimpl.mtp.mtp_layer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_mtp_layer_is_the_written_out_formula(offset):
    rng = np.random.default_rng(0)
    b, t, m, eps = 2, 5, 6, 1e-6
    h, e, w = rng.standard_normal((b, t, m)), rng.standard_normal((b, t, m)), _weights(rng, m)
    mix = rng.standard_normal((m, m))
    # A causal block that mixes positions, so the block's input order matters.
    block = lambda x: np.cumsum(x, axis=1) @ mix  # noqa: E731
    joined = np.concatenate([_rms(e, w["enorm.weight"], eps, offset), _rms(h, w["hnorm.weight"], eps, offset)], -1)
    expected = _rms(block(joined @ w["eh_proj.weight"].T), w["shared_head.norm.weight"], eps, offset)
    got = mtp_layer(h, e, w, rms_norm_eps=eps, block=block, norm_weight_offset=offset)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


def test_eh_proj_reads_the_embedding_half_first():
    # With the hidden half of eh_proj zeroed, the output cannot depend on hidden_states at all.
    rng = np.random.default_rng(1)
    h, e, w = rng.standard_normal((1, 4, 8)), rng.standard_normal((1, 4, 8)), _weights(rng, 8)
    w["eh_proj.weight"][:, 8:] = 0
    first = mtp_layer(h, e, w, rms_norm_eps=1e-6, block=lambda x: x)
    other = mtp_layer(rng.standard_normal((1, 4, 8)), e, w, rms_norm_eps=1e-6, block=lambda x: x)
    np.testing.assert_array_equal(first, other)


def test_mtp_layer_keeps_float32():
    rng = np.random.default_rng(2)
    w = {k: v.astype(np.float32) for k, v in _weights(rng, 4).items()}
    x = rng.standard_normal((1, 3, 4)).astype(np.float32)
    assert mtp_layer(x, x, w, rms_norm_eps=1e-6, block=lambda y: y).dtype == np.float32


@pytest.mark.parametrize("mutate,error,match", [
    (lambda h, e, w: (h, e[:, :-1], w), ShapeError, "differ in shape"),
    (lambda h, e, w: (h[0], e, w), ShapeError, "hidden_states"),
    (lambda h, e, w: (h, e, {k: v for k, v in w.items() if k != "hnorm.weight"}), MissingWeightsError, "hnorm"),
    (lambda h, e, w: (h, e, w | {"eh_proj.weight": w["eh_proj.weight"].T}), ShapeError, "eh_proj.weight"),
    (lambda h, e, w: (h.astype(int), e, w), InputError, "hidden_states"),
    (lambda h, e, w: (h, e.astype(np.float32), w), RefimplError, "one compute dtype"),
    (lambda h, e, w: (h, e, w | {"enorm.weight": w["enorm.weight"].astype(np.float32)}), RefimplError,
     "enorm_weight=float32"),
])
def test_mtp_layer_refuses_bad_input(mutate, error, match):
    rng = np.random.default_rng(3)
    h, e, w = mutate(rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 4)), _weights(rng, 4))
    with pytest.raises(error, match=match):
        mtp_layer(h, e, w, rms_norm_eps=1e-6, block=lambda y: y)


def test_mtp_tensors_are_the_published_names():
    assert MTP_TENSORS == ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


# --- refimpl.mtp.mtp_chain ----------------------------------------------------------------------------------------


def test_chain_feeds_each_depth_the_previous_output_and_the_tokens_k_ahead():
    rng = np.random.default_rng(4)
    embedding = rng.standard_normal((20, 3))
    ids = rng.integers(0, 20, size=(2, 6))
    main = rng.standard_normal((2, 6, 3))
    seen = []

    def depth(scale):
        def run(h, e):
            seen.append((h.copy(), e.copy()))
            return scale * h + e

        return run

    out = mtp_chain(main, ids, embedding, [depth(2.0), depth(3.0), depth(5.0)])
    # Depth k: h^{k-1} at positions 0..T-k-1 and the embeddings of t_{i+k}.
    np.testing.assert_array_equal(seen[0][0], main[:, :5])
    np.testing.assert_array_equal(seen[0][1], embedding[ids[:, 1:]])
    np.testing.assert_array_equal(seen[1][0], out[0][:, :4])
    np.testing.assert_array_equal(seen[1][1], embedding[ids[:, 2:]])
    np.testing.assert_array_equal(seen[2][0], out[1][:, :3])
    np.testing.assert_array_equal(seen[2][1], embedding[ids[:, 3:]])
    np.testing.assert_array_equal(out[1], 3.0 * (2.0 * main[:, :4] + embedding[ids[:, 1:5]]) + embedding[ids[:, 2:]])
    assert [o.shape for o in out] == [(2, 5, 3), (2, 4, 3), (2, 3, 3)]


def test_chain_gives_empty_drafts_where_no_token_is_ahead():
    embedding = np.eye(4)
    out = mtp_chain(np.ones((1, 2, 4)), np.array([[1, 2]]), embedding, [lambda h, e: h + e] * 3)
    assert [o.shape for o in out] == [(1, 1, 4), (1, 0, 4), (1, 0, 4)]


# --- the model API on the golden checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("case_id", MODEL_CASES)
def test_draft_logits_have_one_row_per_position_with_a_token_ahead(mtp_golden, case_id):
    model = refimpl.from_pretrained(mtp_golden / case_id / "checkpoint")
    ids = load_file(mtp_golden / case_id / "io.safetensors")["input_ids"]
    out = model.forward(ids, return_mtp_logits=True)
    depths = model.config.num_nextn_predict_layers
    assert model.has_mtp and len(out.mtp_logits) == depths >= 1
    b, t = ids.shape
    assert [d.shape for d in out.mtp_logits] == [(b, t - k, model.config.vocab_size) for k in range(1, depths + 1)]
    np.testing.assert_array_equal(model.forward(ids).logits, out.logits)
    assert model.forward(ids).mtp_logits is None


@pytest.mark.parametrize("case_id", MODEL_CASES)
def test_depth_k_row_i_reads_tokens_up_to_i_plus_k_only(mtp_golden, case_id):
    # Causality pins the token shift: row i of depth k is computed from t_0 .. t_{i+k}. Cutting the
    # sequence after t_{i+k} keeps the row; changing t_{i+k} changes it.
    model = refimpl.from_pretrained(mtp_golden / case_id / "checkpoint")
    ids = load_file(mtp_golden / case_id / "io.safetensors")["input_ids"][:1]
    full = model.forward(ids, return_mtp_logits=True).mtp_logits
    i = 2
    for k, drafts in enumerate(full, start=1):
        cut = model.forward(ids[:, :i + k + 1], return_mtp_logits=True).mtp_logits[k - 1]
        np.testing.assert_allclose(cut[:, i], drafts[:, i], rtol=1e-12, atol=1e-12)
        changed = ids[:, :i + k + 1].copy()
        changed[0, i + k] = (changed[0, i + k] + 1) % model.config.vocab_size
        moved = model.forward(changed, return_mtp_logits=True).mtp_logits[k - 1]
        assert np.abs(moved[:, i] - drafts[:, i]).max() > 1e-3


def test_second_depth_reads_the_first_depths_output(mtp_golden):
    # MTP-02: depth 2 at row i is depth 2's layer applied to depth 1's output (not the main
    # hidden state) and the embedding of t_{i+2}; recomputed here from the op and the taps.
    case = mtp_golden / "mtp/deepseek-v3-two-depths"
    model = refimpl.from_pretrained(case / "checkpoint")
    ids = load_file(case / "io.safetensors")["input_ids"]
    out = model.forward(ids, return_hidden_states=True, return_mtp_logits=True)
    config = json.loads((case / "checkpoint" / "config.json").read_text())
    weights = {**model.weights, **model.mtp_weights}
    table, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]

    def depth(layer, hidden, shift):
        prefix = f"model.layers.{layer}."
        tensors = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        t = ids.shape[1] - shift
        return OPS["mtp_layer"].function(hidden[:, :t], table[ids[:, shift:]], config=config, **tensors)

    first = depth(2, out.hidden_states["norm"], 1)
    second = depth(3, first, 2)
    np.testing.assert_allclose(first @ head.T, out.mtp_logits[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(second @ head.T, out.mtp_logits[1], rtol=1e-12, atol=1e-12)
    stale = depth(3, out.hidden_states["norm"], 2)
    assert np.abs(stale @ head.T - out.mtp_logits[1]).max() > 1e-2


def _router_calls(run) -> tuple[list, list]:
    """The inputs of every sigmoid (DeepSeek / GLM) and softmax (Qwen3-Next) router call of ``run()``."""
    sigmoid, softmax = [], []
    real_sigmoid, real_softmax = routers.sigmoid_group_top_k, routers.softmax_top_k

    def sigmoid_spy(logits, bias, **kw):
        sigmoid.append((np.array(logits), np.array(bias), kw))
        return real_sigmoid(logits, bias, **kw)

    def softmax_spy(logits, top_k, **kw):
        softmax.append((np.array(logits), top_k))
        return real_softmax(logits, top_k, **kw)

    with mock.patch.object(deepseek_v3, "sigmoid_group_top_k", sigmoid_spy), mock.patch.object(
            glm4_moe, "sigmoid_group_top_k", sigmoid_spy), mock.patch.object(qwen3_next, "softmax_top_k", softmax_spy):
        run()
    return sigmoid, softmax


@pytest.mark.parametrize("case_id", [c.case_id for c in mtp_cases.CASES])
def test_golden_routing_is_clear_of_near_ties(mtp_golden, case_id):
    # Every top-k and kept-group decision of every MoE layer (main and MTP) in float64 is at least
    # ROUTING_MARGIN from a tie, so float16 / bfloat16 engines choose the reference's experts.
    if case_id.startswith("mtp/"):
        model = refimpl.from_pretrained(mtp_golden / case_id / "checkpoint")
        ids = load_file(mtp_golden / case_id / "io.safetensors")["input_ids"]
        sigmoid, softmax = _router_calls(lambda: model.forward(ids, return_mtp_logits=True))
        config = model.config
        moe = (config.moe_layers if hasattr(config, "moe_layers") else config.is_moe if hasattr(config, "is_moe")
               else [k == "sparse" for k in config.mlp_layer_types])
        assert len(sigmoid) + len(softmax) == sum(moe) + config.num_nextn_predict_layers
    else:
        case = next(c for c in mtp_cases.CASES if c.case_id == case_id)
        inputs = case.make_inputs(np.random.default_rng(case.seed))
        sigmoid, softmax = _router_calls(lambda: OPS["mtp_layer"].function(**inputs, **case.params))
        assert len(sigmoid) + len(softmax) == 1
    for logits, top_k in softmax:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        ranked = -np.sort(-probs / probs.sum(-1, keepdims=True), -1)
        assert (ranked[:, top_k - 1] - ranked[:, top_k]).min() > mtp_cases.ROUTING_MARGIN
    for logits, bias, kw in sigmoid:
        scores = 1 / (1 + np.exp(-logits)) + bias
        groups = scores.reshape(len(scores), kw["n_group"], -1)
        group_scores = -np.sort(-np.sort(groups, -1)[..., -2:].sum(-1), -1)
        if kw["topk_group"] < kw["n_group"]:
            assert (group_scores[:, kw["topk_group"] - 1] - group_scores[:, kw["topk_group"]]).min() > \
                mtp_cases.ROUTING_MARGIN
        kept = np.argsort(-np.sort(groups, -1)[..., -2:].sum(-1), -1, kind="stable")[:, :kw["topk_group"]]
        masked = np.full_like(groups, -np.inf)
        rows = np.arange(len(scores))[:, None]
        masked[rows, kept] = groups[rows, kept]
        ranked = -np.sort(-masked.reshape(len(scores), -1), -1)
        assert (ranked[:, kw["top_k"] - 1] - ranked[:, kw["top_k"]]).min() > mtp_cases.ROUTING_MARGIN


# --- loading: MTP tensors are optional, checked, and refused only when asked for ----------------------------------


def _copy_case(mtp_golden, case_id, tmp_path, edit=None, config_edit=None):
    src = mtp_golden / case_id / "checkpoint"
    tensors = load_file(src / "model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    return tmp_path


def test_without_mtp_tensors_the_main_model_loads_and_drafts_are_refused(mtp_golden, tmp_path):
    case = "mtp/deepseek-v3-one-depth"
    ids = load_file(mtp_golden / case / "io.safetensors")["input_ids"]
    path = _copy_case(mtp_golden, case, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith(
        "model.layers.2.")])
    model = refimpl.from_pretrained(path)
    assert not model.has_mtp
    np.testing.assert_array_equal(model(ids), load_file(mtp_golden / case / "io.safetensors")["logits"])
    with pytest.raises(MissingWeightsError, match="no MTP draft logits: checkpoint lacks .* MTP weight"):
        model.forward(ids, return_mtp_logits=True)


@pytest.mark.parametrize("edit,error,match", [
    (lambda t: t.pop("model.layers.2.enorm.weight"), MissingWeightsError, "model.layers.2.enorm.weight"),
    (lambda t: t.__setitem__("model.layers.2.hnorm.weight", np.ones(8, np.float32)), WeightShapeError, "hnorm"),
    (lambda t: t.__setitem__("model.layers.2.eh_proj.bias", np.ones(64, np.float32)), UnexpectedWeightsError,
     "eh_proj.bias"),
    (lambda t: t["model.layers.2.eh_proj.weight"].__setitem__((0, 0), np.nan), Exception, "NaN"),
    (lambda t: t.__setitem__("model.layers.2.shared_head.head.weight", t["lm_head.weight"] + 1),
     UnexpectedWeightsError, "shared_head.head.weight' differs from 'lm_head.weight'"),
], ids=["missing", "shape", "stray", "nan", "copy-differs"])
def test_a_malformed_mtp_set_leaves_the_main_model_and_is_named_when_drafts_are_asked(mtp_golden, tmp_path, edit,
                                                                                        error, match):
    case = "mtp/deepseek-v3-one-depth"
    ids = load_file(mtp_golden / case / "io.safetensors")["input_ids"]
    model = refimpl.from_pretrained(_copy_case(mtp_golden, case, tmp_path, edit))
    np.testing.assert_array_equal(model(ids), load_file(mtp_golden / case / "io.safetensors")["logits"])
    with pytest.raises(error, match=match):
        model.forward(ids, return_mtp_logits=True)


def test_equal_copies_of_embedding_and_head_are_accepted(mtp_golden, tmp_path):
    # DeepSeek-V3 stores model.layers.61.embed_tokens and shared_head.head, copies of the main ones.
    case = "mtp/deepseek-v3-one-depth"
    io = load_file(mtp_golden / case / "io.safetensors")

    def add_copies(t):
        t["model.layers.2.embed_tokens.weight"] = t["model.embed_tokens.weight"].copy()
        t["model.layers.2.shared_head.head.weight"] = t["lm_head.weight"].copy()

    model = refimpl.from_pretrained(_copy_case(mtp_golden, case, tmp_path, add_copies))
    np.testing.assert_array_equal(model.forward(io["input_ids"], return_mtp_logits=True).mtp_logits[0],
                                  io["mtp_logits.1"])


@pytest.mark.parametrize("case_id", [c for c in MODEL_CASES if "qwen3-next" not in c])
def test_deepseek_and_glm_checkpoints_carry_each_depths_copies_as_published(mtp_golden, case_id):
    # model.layers.{L + k - 1}.embed_tokens / shared_head.head, which vLLM-style loaders read the
    # drafts' embedding and head from (DeepSeek-V3's layer 61 and GLM-4.5's layer 92 carry them).
    tensors = load_file(mtp_golden / case_id / "checkpoint" / "model.safetensors")
    config = json.loads((mtp_golden / case_id / "checkpoint" / "config.json").read_text())
    first, depths = config["num_hidden_layers"], config["num_nextn_predict_layers"]
    head = tensors["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
    for layer in range(first, first + depths):
        np.testing.assert_array_equal(tensors[f"model.layers.{layer}.embed_tokens.weight"],
                                      tensors["model.embed_tokens.weight"])
        np.testing.assert_array_equal(tensors[f"model.layers.{layer}.shared_head.head.weight"], head)
    assert refimpl.from_pretrained(mtp_golden / case_id / "checkpoint").has_mtp


def _qwen3_next_with_depths(mtp_golden, tmp_path, depths):
    return _copy_case(mtp_golden, "mtp/qwen3-next-one-depth", tmp_path,
                      config_edit=lambda c: c | {"num_nextn_predict_layers": depths})


def test_qwen3_next_with_two_declared_depths_loads_and_refuses_only_the_drafts(mtp_golden, tmp_path):
    # The main model never reads mtp.*: config.json's num_nextn_predict_layers = 2 must not refuse it.
    io = load_file(mtp_golden / "mtp/qwen3-next-one-depth" / "io.safetensors")
    model = refimpl.from_pretrained(_qwen3_next_with_depths(mtp_golden, tmp_path, 2))
    assert model.config.num_nextn_predict_layers == 2 and not model.has_mtp
    np.testing.assert_array_equal(model(io["input_ids"]), io["logits"])
    with pytest.raises(ConfigError, match=r"^no MTP draft logits: .*num_nextn_predict_layers=2 are not supported"):
        model.forward(io["input_ids"], return_mtp_logits=True)


def test_qwen3_next_refuses_a_negative_depth_count(mtp_golden, tmp_path):
    with pytest.raises(ConfigError, match="num_nextn_predict_layers must be >= 0, got -1"):
        refimpl.from_pretrained(_qwen3_next_with_depths(mtp_golden, tmp_path, -1))


def test_fused_expert_layout_of_an_mtp_depth_is_converted(mtp_golden, tmp_path):
    # transformers' save_pretrained(save_original_format=False) stacks the depth's experts too.
    case = "mtp/glm45-one-depth"
    io = load_file(mtp_golden / case / "io.safetensors")

    def fuse(t):
        prefix = "model.layers.3.mlp.experts."
        t[prefix + "gate_up_proj"] = np.stack([
            np.concatenate([t.pop(f"{prefix}{e}.gate_proj.weight"), t.pop(f"{prefix}{e}.up_proj.weight")])
            for e in range(8)])
        t[prefix + "down_proj"] = np.stack([t.pop(f"{prefix}{e}.down_proj.weight") for e in range(8)])

    model = refimpl.from_pretrained(_copy_case(mtp_golden, case, tmp_path, fuse))
    np.testing.assert_array_equal(model.forward(io["input_ids"], return_mtp_logits=True).mtp_logits[0],
                                  io["mtp_logits.1"])


def test_drafts_refused_for_a_config_without_depths_and_an_architecture_without_mtp(mtp_golden, tmp_path, golden_dir):
    case = "mtp/glm45-one-depth"
    ids = load_file(mtp_golden / case / "io.safetensors")["input_ids"]
    path = _copy_case(mtp_golden, case, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith(
        "model.layers.3.")], lambda c: c | {"num_nextn_predict_layers": 0})
    with pytest.raises(ConfigError, match="declares no MTP depth"):
        refimpl.from_pretrained(path).forward(ids, return_mtp_logits=True)
    qwen3 = refimpl.from_pretrained(golden_dir / "qwen3" / "mha-batch3" / "checkpoint")
    with pytest.raises(ConfigError, match="no multi-token prediction"):
        qwen3.forward(np.zeros((1, 2), np.int64), return_mtp_logits=True)


# --- the op -------------------------------------------------------------------------------------------------------


def test_op_refuses_an_architecture_without_mtp_and_missing_layer_weights(mtp_golden):
    config = mtp_cases.CASES[-1].params["config"]
    x = np.zeros((1, 2, 64))
    with pytest.raises(ConfigError, match="no multi-token-prediction depth"):
        OPS["mtp_layer"].function(x, x, config={"architectures": ["Qwen3ForCausalLM"], "vocab_size": 8,
                                                "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(MissingWeightsError, match="input_layernorm.weight"):
        OPS["mtp_layer"].function(x, x, config=config, **_weights(np.random.default_rng(0), 64))


# --- the suite: golden format, runner, backends -------------------------------------------------------------------


def test_manifest_records_the_depths_and_the_data_file_holds_them(mtp_golden):
    cases = {c.id: c for c in load_manifest(mtp_golden)}
    assert {cid: cases[cid].mtp_depths for cid in MODEL_CASES} == {
        "mtp/deepseek-v3-one-depth": 1, "mtp/deepseek-v3-two-depths": 2, "mtp/glm45-one-depth": 1,
        "mtp/glm45-two-depths-tied": 2, "mtp/qwen3-next-one-depth": 1}
    assert cases["op/mtp_layer/glm45"].mtp_depths == 0
    drafts = load_case_mtp_logits(mtp_golden, cases["mtp/deepseek-v3-two-depths"])
    assert {k: v.shape for k, v in drafts.items()} == {"mtp_logits.1": (2, 9, 128), "mtp_logits.2": (2, 8, 128)}


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_manifest_refuses_a_bad_mtp_depths(mtp_golden, tmp_path, value):
    import shutil

    copy = tmp_path / "golden"
    shutil.copytree(mtp_golden, copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["cases"][0]["mtp_depths"] = value
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="mtp_depths"):
        read_manifest(copy)


def test_data_file_lacking_a_depth_is_a_manifest_error(mtp_golden):
    case = next(c for c in load_manifest(mtp_golden) if c.id == "mtp/glm45-one-depth")
    with pytest.raises(ManifestError, match="lacks tensor 'mtp_logits.2'"):
        load_case_mtp_logits(mtp_golden, replace(case, mtp_depths=2))


class _NoDrafts(RefimplBackend):
    """A backend that knows nothing of MTP: it returns the main logits and taps only."""

    name = "no-drafts"

    def load_model(self, checkpoint_dir, dtype):
        inner = super().load_model(checkpoint_dir, dtype)

        class Model(RefimplModel):
            def run(self, input_ids):
                out = inner.run(input_ids)
                return BackendOutput(logits=out.logits, hidden_states=out.hidden_states)

        return Model(inner.model)


def test_runner_compares_drafts_and_reports_not_implemented_without_them(mtp_golden):
    case = next(c for c in load_manifest(mtp_golden) if c.id == "mtp/deepseek-v3-two-depths")
    passed = run_case(RefimplBackend(), case, mtp_golden, "float64")
    assert passed.status is Status.PASSED
    assert list(passed.comparisons)[-3:] == ["logits", "mtp_logits.1", "mtp_logits.2"]
    missing = run_case(_NoDrafts(), case, mtp_golden, "float64")
    assert missing.status is Status.NOT_IMPLEMENTED
    assert "returned no MTP draft logits" in missing.message


class _FirstDepthOnly(RefimplBackend):
    """The reference, returning only its depth-1 drafts (an engine that drafts one token)."""

    name = "first-depth-only"

    def load_model(self, checkpoint_dir, dtype):
        inner = super().load_model(checkpoint_dir, dtype)

        class Model(RefimplModel):
            def run(self, input_ids):
                out = inner.run(input_ids)
                return BackendOutput(logits=out.logits, hidden_states=out.hidden_states,
                                     mtp_logits=out.mtp_logits[:1])

        return Model(inner.model)


def test_a_backend_returning_fewer_depths_than_the_case_fails(mtp_golden):
    case = next(c for c in load_manifest(mtp_golden) if c.id == "mtp/deepseek-v3-two-depths")
    result = run_case(_FirstDepthOnly(), case, mtp_golden, "float64")
    assert result.status is Status.FAILED and result.first_divergence == "mtp_logits.2"
    assert "returned 1 MTP depth(s), the case has 2" in result.message


def test_transformers_backend_refuses_mtp_cases_it_has_no_modules_for(mtp_golden):
    pytest.importorskip("transformers")
    from conformance.backends.transformers_backend import TransformersBackend

    cases = {c.id: c for c in load_manifest(mtp_golden)}
    backend = TransformersBackend()
    assert backend.supports(cases["mtp/glm45-one-depth"], "bfloat16") is True
    reason = backend.supports(cases["mtp/qwen3-next-one-depth"], "float32")
    assert "no multi-token-prediction modules for 'Qwen3NextForCausalLM'" in reason
    assert backend.supports(replace(cases["mtp/qwen3-next-one-depth"], mtp_depths=0), "float32") is True


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_transformers_backend_passes_the_mtp_corpus(mtp_golden, tmp_path, dtype):
    # Through transformers' own MtpModel / MtpLayer; Qwen3-Next's model case has no transformers MTP.
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from conformance.cli import cli

    report = tmp_path / "report.json"
    CliRunner().invoke(cli, ["run", "--backend", "transformers", "--dtype", dtype, "--golden-dir", str(mtp_golden),
                             "--report", str(report)])
    statuses = {r["case_id"]: r["status"] for r in json.loads(report.read_text())["results"]}
    assert statuses.pop("mtp/qwen3-next-one-depth") == "not implemented"
    assert set(statuses.values()) == {"passed"}, statuses
