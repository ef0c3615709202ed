"""``llm-refimpl generate``: greedy generation, tokenizer and chat template, against transformers.

Everything is built here, nothing is downloaded: a byte-level BPE tokenizer trained
with the ``tokenizers`` library on a few sentences (300 tokens, three special ones),
a ``tokenizer_config.json`` with a small chat template that uses what transformers'
Jinja environment offers (trim_blocks, lstrip_blocks, ``namespace``, ``tojson``,
``raise_exception``, ``{% continue %}``, ``{% generation %}``), and tiny random
Qwen3 and Qwen3-MoE checkpoints written by transformers' ``save_pretrained``.
The expected values come from transformers (``AutoTokenizer``, ``generate``), never
from the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from refimpl.cli import cli
from refimpl.errors import InputError, RefimplError
from refimpl.generate import Generation, compare_generations, greedy_generate, normalise_stop_ids
from refimpl.tokenizer import ChatTemplateError, TokenizerError, chat_messages, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 300
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A reference implementation agrees with transformers, token by token.",
    "Greedy decoding picks the most likely token, step by step. Sé amable <b>siempre</b>!",
]
TEMPLATE = """\
{%- set ns = namespace(system=none) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'] %}
        {% continue %}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if ns.system is not none and loop.index0 == 1 %}
[system {{ ns.system | tojson }}]
    {% endif %}
{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% if enable_thinking is defined and not enable_thinking %}
<think></think>
    {% endif %}
{% endif %}
"""
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def train_tokenizer(bos_post_processor: bool = False):
    """A byte-level BPE of exactly VOCAB tokens; optionally a post-processor that prepends a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    assert tok.get_vocab_size() == VOCAB
    if bos_post_processor:
        bos = SPECIALS[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_tokenizer(directory, template_source="config", bos_post_processor=False, **config_extra):
    """tokenizer.json and tokenizer_config.json; the template in the config ("config"), in
    chat_template.jinja ("jinja", with a different one left in the config), as a named
    list ("list"), or absent (None)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer(bos_post_processor).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[2],
              "pad_token": SPECIALS[0], **config_extra}
    if template_source == "config":
        config["chat_template"] = TEMPLATE
    elif template_source == "jinja":
        config["chat_template"] = OTHER_TEMPLATE
        (directory / "chat_template.jinja").write_text(TEMPLATE)
    elif template_source == "list":
        config["chat_template"] = [{"name": "tool_use", "template": OTHER_TEMPLATE},
                                   {"name": "default", "template": TEMPLATE}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def hf_tokenizer(directory):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory))


# ---- tokenizer and chat template against transformers' AutoTokenizer --------------------------------------------

PROMPTS = [("Does the fox agree?", None, {}),
           ("  step by step  ", "Sé amable <b>siempre</b> & \"quote\"", {}),
           ("The lazy dog.", "be brief", {"enable_thinking": False})]


@pytest.fixture(scope="module", params=["config", "jinja", "list"])
def tokenizer_dir(request, tmp_path_factory):
    pytest.importorskip("transformers")
    # A BOS post-processor in two of them: the template writes the BOS, encoding must not add another.
    return write_tokenizer(tmp_path_factory.mktemp(f"tok-{request.param}"), request.param,
                           bos_post_processor=request.param != "config")


@pytest.mark.parametrize("prompt,system,variables", PROMPTS)
def test_render_chat_equals_transformers_apply_chat_template(tokenizer_dir, prompt, system, variables):
    ours = load_tokenizer(tokenizer_dir)
    theirs = hf_tokenizer(tokenizer_dir)
    messages = chat_messages(prompt, system)
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **variables)
    assert ours.render_chat(messages, add_generation_prompt=True, **variables) == expected
    expected_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                              **variables)
    assert ours.encode_chat(messages, **variables).tolist() == list(expected_ids)
    # The template the files select is the one under test, not OTHER_TEMPLATE.
    assert expected.startswith(SPECIALS[0]) and "<|im_start|>assistant\n" in expected


def test_render_without_generation_prompt_equals_transformers(tokenizer_dir):
    messages = chat_messages("hello", "sys") + [{"role": "assistant", "content": "fox"}]
    expected = hf_tokenizer(tokenizer_dir).apply_chat_template(messages, tokenize=False)
    assert load_tokenizer(tokenizer_dir).render_chat(messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize("bos", [False, True])
def test_plain_prompt_ids_and_decode_equal_transformers(tmp_path, bos):
    pytest.importorskip("transformers")
    directory = write_tokenizer(tmp_path, None, bos_post_processor=bos)
    ours, theirs = load_tokenizer(directory), hf_tokenizer(directory)
    text = "The fox <|im_end|> agrees, step by step!"
    ids = ours.encode(text)
    assert ids.tolist() == theirs(text)["input_ids"]
    assert (ids[0] == ours.token_id(SPECIALS[0])) == bos
    assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True)
    assert ours.chat_template is None


def test_clean_up_tokenization_spaces_as_transformers(tmp_path):
    # A word-level tokenizer (cleanup applies) and a BPE one (transformers 5 skips it).
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "I", "do", "n't", "know", ".", "you", "'re", "right", ","]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_dir = tmp_path / "word"
    word_dir.mkdir()
    tok.save(str(word_dir / "tokenizer.json"))
    bpe_dir = write_tokenizer(tmp_path / "bpe", None)
    for directory in (word_dir, bpe_dir):
        config = json.loads((directory / "tokenizer_config.json").read_text()) if directory == bpe_dir else {
            "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
        config["clean_up_tokenization_spaces"] = True
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    pytest.importorskip("transformers")
    word_ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    expected = "I don't know. you're right,"
    assert load_tokenizer(word_dir).decode(word_ids) == hf_tokenizer(word_dir).decode(word_ids) == expected
    bpe = load_tokenizer(bpe_dir)
    bpe_ids = bpe.encode("step by step , token .").tolist()
    assert bpe.decode(bpe_ids) == hf_tokenizer(bpe_dir).decode(bpe_ids) == "step by step , token ."


def test_special_token_missing_from_tokenizer_json_is_added_like_transformers(tmp_path):
    pytest.importorskip("transformers")
    directory = write_tokenizer(tmp_path, "config", extra_special_tokens=["<|tool|>"])
    ours, theirs = load_tokenizer(directory), hf_tokenizer(directory)
    assert ours.token_id("<|tool|>") == theirs.convert_tokens_to_ids("<|tool|>") == VOCAB
    assert ours.encode("a<|tool|>b").tolist() == theirs("a<|tool|>b")["input_ids"]


@pytest.mark.parametrize("with_decoder", [False, True])
def test_legacy_special_tokens_map_as_transformers(tmp_path, with_decoder):
    # Without added_tokens_decoder in the config, special_tokens_map.json's entries win.
    pytest.importorskip("transformers")
    extra = {"added_tokens_decoder": {}} if with_decoder else {}
    directory = write_tokenizer(tmp_path, "config", **extra)
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": SPECIALS[0], "lstrip": False, "rstrip": False, "normalized": False,
                       "single_word": False}, "bos_token": SPECIALS[1]}))
    ours, theirs = load_tokenizer(directory), hf_tokenizer(directory)
    assert ours.special_tokens["eos_token"] == theirs.eos_token == (SPECIALS[2] if with_decoder else SPECIALS[0])
    messages = chat_messages("fox", "dog")
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages) == expected


def test_template_raise_exception_and_syntax_errors_are_chat_template_errors(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path, "config"))
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    bad = write_tokenizer(tmp_path / "bad", None, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_tokenizer(bad).render_chat(chat_messages("hi"))
    sandboxed = write_tokenizer(tmp_path / "sandbox", None,
                                chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}")
    with pytest.raises(ChatTemplateError, match="_x"):
        load_tokenizer(sandboxed).render_chat(chat_messages("hi"))


def test_several_templates_without_default_is_an_error(tmp_path):
    directory = write_tokenizer(tmp_path, None, chat_template=[{"name": "a", "template": "x"},
                                                               {"name": "b", "template": "y"}])
    with pytest.raises(TokenizerError, match="none named 'default'"):
        load_tokenizer(directory)


# ---- greedy generation and its comparison, without a model ------------------------------------------------------

def table_model(table):
    """next_logits reading row ``len(ids) - 1`` of a fixed table (V = its width)."""
    return lambda ids: np.asarray(table[len(ids) - 1], dtype=np.float32)


def test_greedy_generate_keeps_the_stop_id_and_stops():
    table = [[0, 1, 5, 2], [3, 0, 0, 0], [0, 0, 0, 9], [9, 0, 0, 0]]
    run = greedy_generate(table_model(table), [1], 10, stop_ids=(3,))
    assert run.new_ids.tolist() == [2, 0, 3] and run.stop_reason == "eos"
    assert run.logits.shape == (3, 4) and run.logits.dtype == np.float64
    capped = greedy_generate(table_model(table), [1], 2, stop_ids=(3,))
    assert capped.new_ids.tolist() == [2, 0] and capped.stop_reason == "max_new_tokens"
    # T = 1 prompt, N = 1: one call, one token.
    assert greedy_generate(table_model(table), [0], 1).new_ids.tolist() == [2]


def test_greedy_generate_ties_go_to_the_lowest_id_and_nan_is_refused():
    assert greedy_generate(lambda ids: np.array([1.0, 4.0, 4.0, 4.0]), [0], 1).new_ids.tolist() == [1]
    with pytest.raises(RefimplError, match="NaN or Inf"):
        greedy_generate(lambda ids: np.array([1.0, np.nan]), [0], 1)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_greedy_generate_refuses_bad_max_new_tokens(n):
    with pytest.raises(InputError, match="max_new_tokens"):
        greedy_generate(lambda ids: np.zeros(3), [0], n)


def test_compare_generations_reports_errors_only_on_a_shared_prefix():
    prompt = np.array([5], dtype=np.int64)
    logits = np.array([[0.0, 3.0, 4.0], [1.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    ours = Generation(prompt, np.array([2, 1, 0]), logits, "max_new_tokens")
    theirs = Generation(prompt, np.array([2, 0]), logits[:2] + [[0, 0, 0.5], [0.9, 0, 0]], "eos")
    comparison = compare_generations(ours, theirs)
    assert comparison.first_difference == 1 and not comparison.agree
    assert [(r.ours, r.theirs) for r in comparison.steps] == [(2, 2), (1, 0), (0, None)]
    assert comparison.steps[0].max_abs == pytest.approx(0.5)
    assert comparison.steps[0].rel_rms == pytest.approx(0.5 / 5.0)
    assert comparison.steps[1].max_abs == pytest.approx(0.9) and comparison.steps[2].max_abs is None
    assert comparison.summary() == "first difference at step 1: ours 1, theirs 0"
    same = compare_generations(ours, ours)
    assert same.agree and same.summary() == "agree for 3 steps" and same.steps[2].rel_rms == 0.0


def test_stop_ids_accept_an_int_or_a_list_only():
    assert normalise_stop_ids(None, "x") == () and normalise_stop_ids(7, "x") == (7,)
    assert normalise_stop_ids([7, 2, 7], "x") == (7, 2)
    for bad in ("7", [7, "2"], True, -1, [[1]], 2.0):
        with pytest.raises(InputError, match="eos_token_id"):
            normalise_stop_ids(bad, "generation_config.json")


# ---- the command on tiny random checkpoints, against transformers' generate ------------------------------------

def build_checkpoint(directory, arch: str, seed: int):
    """A tiny random Qwen3 / Qwen3-MoE saved by transformers, with the tokenizer above
    (template in the config, a BOS post-processor) and generation_config.json stopping at <|im_end|> or <|endoftext|>."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_agreement import randomise

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                  eos_token_id=VOCAB - 1, bos_token_id=0)
    if arch == "qwen3":
        config, cls = transformers.Qwen3Config(intermediate_size=72, **common), transformers.Qwen3ForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=12, num_experts=6,
                                             num_experts_per_tok=2, norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    randomise(model, seed)
    model.save_pretrained(directory)
    write_tokenizer(directory, "config", bos_post_processor=True)
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    stops = [tok.token_to_id(SPECIALS[2]), tok.token_to_id(SPECIALS[0])]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return directory


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", 901)


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3-moe"), "qwen3_moe", 902)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def generate_json(directory, *args):
    result = invoke("generate", directory, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def transformers_greedy(directory, prompt_ids, n):
    """transformers' own greedy generate (its generation_config.json, its KV cache), float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                              attn_implementation="eager",
                                                              experts_implementation="eager")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_ids_equal_transformers_generate(qwen3_dir, dtype):
    report = generate_json(qwen3_dir, "--prompt", "Does the fox agree?", "--system", "be brief",
                           "--max-new-tokens", 12, "--dtype", dtype)
    messages = chat_messages("Does the fox agree?", "be brief")
    expected_prompt = hf_tokenizer(qwen3_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                  return_dict=False)
    assert report["prompt_ids"] == list(expected_prompt) and report["chat"]
    assert report["generated_ids"] == transformers_greedy(qwen3_dir, report["prompt_ids"], 12)
    assert report["text"] == hf_tokenizer(qwen3_dir).decode(report["generated_ids"], skip_special_tokens=True)
    assert report["architecture"] == "Qwen3ForCausalLM" and report["dtype"] == dtype


def test_stops_at_an_eos_from_generation_config_like_transformers(qwen3_dir, tmp_path):
    free = generate_json(qwen3_dir, "--prompt", "step by step", "--no-chat", "--no-stop", "--max-new-tokens", 10)
    assert free["stop_ids"] == [] and free["stop_reason"] == "max_new_tokens" and len(free["generated_ids"]) == 10
    ids = free["generated_ids"]
    # The first token (after step 1) not seen before becomes an EOS: the run must end right there.
    k = next(i for i in range(2, 10) if ids[i] not in ids[:i])
    stopping = tmp_path / "stopping"
    shutil.copytree(qwen3_dir, stopping)
    (stopping / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[k], VOCAB - 1]}))
    report = generate_json(stopping, "--prompt", "step by step", "--no-chat", "--max-new-tokens", 10)
    assert report["generated_ids"] == ids[:k + 1] and report["stop_reason"] == "eos"
    assert report["generated_ids"] == transformers_greedy(stopping, report["prompt_ids"], 10)
    # Without generation_config.json, config.json's eos_token_id (an int) is the stop id.
    (stopping / "generation_config.json").unlink()
    config = json.loads((stopping / "config.json").read_text())
    (stopping / "config.json").write_text(json.dumps({**config, "eos_token_id": ids[k]}))
    assert generate_json(stopping, "--prompt", "step by step", "--no-chat")["stop_ids"] == [ids[k]]


@pytest.mark.parametrize("fixture", ["qwen3_dir", "qwen3_moe_dir"])
def test_compare_transformers_reports_agreement(request, fixture):
    directory = request.getfixturevalue(fixture)
    report = generate_json(directory, "--prompt", "The quick brown fox", "--max-new-tokens", 8,
                           "--compare-transformers")
    theirs = report["transformers"]
    assert theirs["agree"] and theirs["first_difference"] is None
    assert theirs["generated_ids"] == report["generated_ids"]
    assert theirs["generated_ids"] == transformers_greedy(directory, report["prompt_ids"], 8)
    assert len(theirs["steps"]) == len(report["generated_ids"]) == 8
    for step in theirs["steps"]:
        assert step["rel_rms"] < 1e-5 and step["max_abs_logit_error"] < 1e-4, step
    text = invoke("generate", directory, "--prompt", "The quick brown fox", "--max-new-tokens", 8,
                  "--compare-transformers")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0] == report["text"] and lines[-1] == "refimpl vs transformers: agree for 8 steps"
    assert lines[1].split() == ["step", "refimpl", "transformers", "max", "|dlogit|", "rel", "RMS"]


def test_compare_transformers_reports_the_first_difference(qwen3_dir, monkeypatch):
    # A reference whose logits favour one token from step 2 on: the report must name step 2.
    import refimpl.cli

    real = refimpl.cli.cached_next_logits

    def biased(model):
        next_logits = real(model)
        start = None

        def wrapped(ids):
            nonlocal start
            start = len(ids) if start is None else start
            logits = next_logits(ids).copy()
            if len(ids) - start >= 2:
                logits[7] += 1e3
            return logits

        return wrapped

    monkeypatch.setattr(refimpl.cli, "cached_next_logits", biased)
    result = invoke("generate", qwen3_dir, "--prompt", "The quick brown fox", "--max-new-tokens", 6,
                    "--compare-transformers", "--json")
    assert result.exit_code == 1, result.output
    theirs = json.loads(result.stdout)["transformers"]
    assert not theirs["agree"] and theirs["first_difference"] == 2
    steps = theirs["steps"]
    assert steps[2]["refimpl"] == 7 and steps[2]["transformers"] != 7 and steps[2]["max_abs_logit_error"] > 900
    assert steps[1]["rel_rms"] < 1e-5 and all(s["rel_rms"] is None for s in steps[3:])


# ---- errors: one line, exit status 2 ----------------------------------------------------------------------------

def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def linked_copy(source, target, drop=(), write=None):
    """``target`` with ``source``'s files symlinked (except ``drop``), plus ``write`` {name: text}."""
    target.mkdir()
    for path in source.iterdir():
        if path.name not in drop and path.name not in (write or {}):
            (target / path.name).symlink_to(path)
    for name, text in (write or {}).items():
        (target / name).write_text(text)
    return target


def test_missing_tokenizer_json(qwen3_dir, tmp_path):
    directory = linked_copy(qwen3_dir, tmp_path / "c", drop=("tokenizer.json",))
    assert_one_line_error(invoke("generate", directory, "--prompt", "hi"), "tokenizer.json not found")


def test_unknown_architecture(qwen3_dir, tmp_path):
    config = json.loads((qwen3_dir / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    directory = linked_copy(qwen3_dir, tmp_path / "c", write={"config.json": json.dumps(config)})
    assert_one_line_error(invoke("generate", directory, "--prompt", "hi"), "unknown architecture 'FooForCausalLM'")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(qwen3_dir, prompt):
    assert_one_line_error(invoke("generate", qwen3_dir, "--prompt", prompt), "prompt is empty")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_max_new_tokens_below_one(qwen3_dir, n):
    assert_one_line_error(invoke("generate", qwen3_dir, "--prompt", "hi", "--max-new-tokens", n),
                          "--max-new-tokens must be at least 1")


def test_token_ids_beyond_the_vocabulary(qwen3_dir, tmp_path):
    config = json.loads((qwen3_dir / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<|tool|>"]
    directory = linked_copy(qwen3_dir, tmp_path / "c", write={"tokenizer_config.json": json.dumps(config)})
    assert_one_line_error(invoke("generate", directory, "--prompt", "a <|tool|>", "--no-chat"),
                          "token id 300 ('<|tool|>') at prompt position", "vocab_size 300")


def test_chat_template_errors_and_misused_chat_options(qwen3_dir, tmp_path):
    no_template = linked_copy(qwen3_dir, tmp_path / "plain", write={"tokenizer_config.json": "{}"})
    assert_one_line_error(invoke("generate", no_template, "--prompt", "hi", "--chat"), "has no chat template")
    assert_one_line_error(invoke("generate", no_template, "--prompt", "hi", "--system", "s"),
                          "--system and --template-var need the chat template")
    raising = linked_copy(qwen3_dir, tmp_path / "raising", write={
        "tokenizer_config.json": json.dumps({"chat_template": "{{ raise_exception('no ' + 'system') }}"})})
    assert_one_line_error(invoke("generate", raising, "--prompt", "hi"), "chat template raised: no system")


def test_template_var_reaches_the_template(qwen3_dir):
    report = generate_json(qwen3_dir, "--prompt", "hi", "--template-var", "enable_thinking=false",
                           "--max-new-tokens", 1)
    assert report["rendered_prompt"].endswith("<|im_start|>assistant\n<think></think>\n")


def test_console_script_process_prints_one_line_errors(tmp_path):
    # The real entry point in its own process: usage and input errors, exit status 2.
    for args, fragment in ((["generate", str(tmp_path), "--prompt", "hi"], "config.json: file not found"),
                           (["generate", str(tmp_path)], "Missing option '--prompt'"),
                           (["generate", str(tmp_path), "--prompt", "hi", "--template-var", "x"],
                            "expected NAME=VALUE"),
                           (["generate", str(tmp_path), "--prompt", "hi", "--template-var", "messages=[]"],
                            "'messages' is set by the command itself")):
        done = subprocess.run([sys.executable, "-m", "refimpl.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and fragment in done.stderr
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["llm-refimpl"] == "refimpl.cli:main"
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "tokenizers" in deps and "jinja2" in deps


def test_compare_transformers_refuses_an_architecture_transformers_lacks(golden_dir, tmp_path):
    # Grok's model_type "git" would load transformers' unrelated GitForCausalLM with random weights.
    import shutil

    grok = tmp_path / "grok"
    shutil.copytree(golden_dir / "grok2" / "single-token" / "checkpoint", grok)
    write_tokenizer(grok, template_source=None)
    result = invoke("generate", grok, "--prompt", "q", "--max-new-tokens", 1, "--no-chat",
                    "--compare-transformers")
    assert result.exit_code == 2, result.output
    assert "has no model class 'Grok1ForCausalLM'" in result.output and "Traceback" not in result.output


def test_cached_generation_equals_full_forward_generation():
    # The cached path (prefill, then one decode per token) against the definition (a full
    # forward per step) on a sliding-window checkpoint, longer than the window.
    import refimpl
    from refimpl.generate import cached_next_logits, full_forward_next_logits

    model = refimpl.from_pretrained(ROOT / "golden" / "qwen3" / "sliding-window" / "checkpoint")
    prompt = np.array([3, 17, 5, 9, 1])
    cached = greedy_generate(cached_next_logits(model), prompt, 12, ())
    full = greedy_generate(full_forward_next_logits(model), prompt, 12, ())
    np.testing.assert_array_equal(cached.new_ids, full.new_ids)
    assert np.max(np.abs(cached.logits - full.logits)) <= 1e-10 * np.max(np.abs(full.logits))
    # A prompt that does not extend the previous ids starts over with a prefill.
    next_logits = cached_next_logits(model)
    next_logits(np.array([1, 2, 3]))
    np.testing.assert_allclose(next_logits(np.array([4, 5])), model(np.array([[4, 5]]))[0, -1], rtol=0, atol=1e-12)
