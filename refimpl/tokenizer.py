"""A checkpoint's tokenizer and chat template, read the way transformers reads them.

Text goes to token ids through the Hugging Face ``tokenizers`` library, from the
checkpoint's ``tokenizer.json``; nothing here tokenizes by itself. What this module
adds is what transformers' ``PreTrainedTokenizerFast`` adds on top of that file:

* the named special tokens of ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
  ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``; a string or
  an ``AddedToken`` dict), overridden by the legacy ``special_tokens_map.json`` when the
  config has no ``added_tokens_decoder``, and the extra special tokens; each is
  registered as a special token if ``tokenizer.json`` does not list it already, and
  the named ones' strings are variables of the chat template;
* the chat template: ``chat_template.jinja`` (and named ones in
  ``additional_chat_templates/*.jinja``), which take priority over the
  ``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of
  ``{"name", "template"}``); of several, the one named ``default`` is used;
* rendering in a sandboxed Jinja environment with transformers' settings:
  ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension and a
  ``{% generation %}`` block tag (rendered as its body), a ``tojson`` filter that does
  not escape HTML or non-ASCII, and the globals ``raise_exception``, ``strftime_now``,
  ``dict`` and ``namespace`` (refusing underscore-prefixed names);
* a rendered chat is encoded without the post-processor's special tokens (the
  template writes its own BOS); a plain prompt is encoded with them (whatever
  ``tokenizer.json``'s post-processor adds; transformers ignores
  ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` when
  ``tokenizer.json`` exists);
* decoding skips special tokens and applies ``clean_up_tokenization_spaces`` when
  ``tokenizer_config.json`` asks for it, except for BPE models (transformers 5 skips it
  there, since it deletes real spaces before punctuation).

Not reproduced: model-specific tokenizer classes of transformers that rebuild parts of
``tokenizer.json`` (for example the Mistral pre-tokenizer regex patch for vocabularies
over 100000 tokens), the tool, document and assistant-mask arguments of
``apply_chat_template``, and ``sanitize_control_tokens``.

Checked against: transformers 5.24 ``tokenization_utils_base.py``
(``PreTrainedTokenizerBase._from_pretrained``, ``apply_chat_template``,
``get_chat_template``), ``tokenization_utils_tokenizers.py`` (``TokenizersBackend.__init__``,
``_decode``) and ``utils/chat_template_utils.py`` (``_cached_compile_jinja_template``,
``render_jinja_template``); ``tests/test_generate.py`` compares rendered prompts, ids and
decoded text with ``AutoTokenizer`` on tokenizers built there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from .checkpoint import read_json
from .errors import CheckpointError, InputError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

#: transformers' ``SPECIAL_TOKENS_ATTRIBUTES``: the named special tokens a template sees.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: keys of tokenizer_config.json listing further special tokens (v5 name, then the older one).
EXTRA_SPECIAL_TOKENS = ("extra_special_tokens", "additional_special_tokens")


class TokenizerError(CheckpointError):
    """A checkpoint's tokenizer files are missing, unreadable or inconsistent."""


class ChatTemplateError(TokenizerError):
    """A chat template does not compile, or raises while it is rendered."""


@dataclass(frozen=True)
class CheckpointTokenizer:
    """The tokenizer of one checkpoint directory; build it with :func:`load_tokenizer`.

    Attributes:
        backend: the ``tokenizers.Tokenizer`` read from ``tokenizer.json``, with the
            named and extra special tokens of the config registered.
        special_tokens: ``{"bos_token": "<s>", ...}``: the named special tokens as strings
            (transformers' ``special_tokens_map``); only those the files set.
        chat_template: the Jinja source of the chat template, or None.
        clean_up_spaces: apply transformers' ``clean_up_tokenization`` when decoding.
    """

    backend: object
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    clean_up_spaces: bool = False

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids ``(T,)`` int64 of ``text``; with ``add_special_tokens`` the
        post-processor of tokenizer.json adds its tokens (a BOS, for some models)."""
        return np.asarray(self.backend.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """Text of token ids, special tokens skipped (transformers' ``decode(ids, skip_special_tokens=True)``)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (special tokens included), or None for an id it lacks."""
        return self.backend.id_to_token(int(token_id))

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None."""
        return self.backend.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The chat template rendered over ``messages`` (see :func:`render_chat_template`).

        Raises:
            TokenizerError: the checkpoint has no chat template.
            ChatTemplateError: the template does not compile or raises.
        """
        if self.chat_template is None:
            raise TokenizerError("the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    {**self.special_tokens, **variables})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> np.ndarray:
        """Token ids ``(T,)`` of the rendered chat, without the post-processor's special
        tokens (transformers' ``apply_chat_template(..., tokenize=True)``)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **variables), add_special_tokens=False)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before ``. ? ! ,`` and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _token_content(value, where: str) -> tuple[str, dict]:
    """``(content, AddedToken options)`` of a special token given as a string or an AddedToken dict."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized")
        options = {k: value[k] for k in flags if isinstance(value.get(k), bool)}
        return value["content"], options
    raise TokenizerError(f"{where}: a special token must be a string or an object with a 'content' string, "
                         f"got {value!r}")


def special_token_entries(config: dict, legacy_map: dict, where: str) -> tuple[dict[str, tuple[str, dict]], list]:
    """The named special tokens (``{name: (content, options)}``) and the extra ones
    (``[(content, options)]``) of tokenizer_config.json.

    As in transformers, the legacy special_tokens_map.json is read only when the config
    has no ``added_tokens_decoder`` (older checkpoints); its entries then replace the
    config's (a null one removes the token), and its extra tokens join the config's.

    Raises:
        TokenizerError: a token that is neither a string nor an AddedToken dict.
    """
    sources = [(config, where)]
    if "added_tokens_decoder" not in config:
        sources.append((legacy_map, SPECIAL_TOKENS_MAP_FILE))
    named, extra = {}, []
    for source, name_of_file in sources:
        for name in NAMED_SPECIAL_TOKENS:
            if source.get(name) is not None:
                named[name] = _token_content(source[name], f"{name_of_file} '{name}'")
            elif name in source:
                named.pop(name, None)
        for key in EXTRA_SPECIAL_TOKENS:
            values = source.get(key)
            # A dict of extra special tokens names model-specific ones ({"image_token": "<img>"}).
            values = list(values.values()) if isinstance(values, dict) else values or []
            if not isinstance(values, list):
                raise TokenizerError(f"{name_of_file}: '{key}' must be a list or an object, "
                                     f"got {type(values).__name__}")
            extra += [t for t in (_token_content(v, f"{name_of_file} '{key}'") for v in values) if t not in extra]
    return named, extra


def read_chat_template(checkpoint_dir: Path, config: dict) -> str | None:
    """The chat template source of a checkpoint, chosen as transformers chooses it.

    ``chat_template.jinja`` ("default") and ``additional_chat_templates/NAME.jinja``
    replace any template in ``config`` (tokenizer_config.json). Several templates: the
    one named ``default``.

    Raises:
        TokenizerError: the entry is not a string or a list of ``{"name", "template"}``
            objects, or there are several templates and none is named ``default``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    templates = {}
    if (checkpoint_dir / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = _read_text(checkpoint_dir / CHAT_TEMPLATE_FILE)
    for path in sorted((checkpoint_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if not templates:
        templates = _config_templates(config.get("chat_template"))
    if not templates:
        return None
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if "default" not in templates:
        raise TokenizerError(f"{checkpoint_dir}: several chat templates ({', '.join(sorted(templates))}) "
                             "and none named 'default'")
    return templates["default"]


def _config_templates(entry) -> dict[str, str]:
    """``{name: source}`` of tokenizer_config.json's ``chat_template`` entry."""
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in entry):
        return {t["name"]: t["template"] for t in entry}
    raise TokenizerError(f"{TOKENIZER_CONFIG_FILE}: 'chat_template' must be a string or a list of "
                         f"{{'name', 'template'}} objects, got {type(entry).__name__}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from None


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise TokenizerError(f"reading tokenizer.json needs the tokenizers package ({exc}); "
                             "pip install tokenizers") from None
    return tokenizers


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def load_tokenizer(checkpoint_dir) -> CheckpointTokenizer:
    """Read the tokenizer of a checkpoint directory.

    Args:
        checkpoint_dir: a directory with ``tokenizer.json``; ``tokenizer_config.json``,
            ``special_tokens_map.json``, ``chat_template.jinja`` and
            ``additional_chat_templates/`` are optional.

    Raises:
        TokenizerError: ``tokenizer.json`` missing or not readable by ``tokenizers``, a
            special token or chat template entry of the wrong type.
        CheckpointError: an optional JSON file is not a JSON object.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{checkpoint_dir}: {TOKENIZER_FILE} not found (the tokenizer is read from it)")
    tokenizers = _import_tokenizers()
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions for malformed files
        raise TokenizerError(f"{path}: the tokenizers library cannot read it ({exc})") from None
    config = _optional_json(checkpoint_dir / TOKENIZER_CONFIG_FILE)
    legacy = _optional_json(checkpoint_dir / SPECIAL_TOKENS_MAP_FILE)
    named, extra = special_token_entries(config, legacy, TOKENIZER_CONFIG_FILE)
    # transformers registers every named and extra special token, whether or not
    # tokenizer.json lists it: afterwards each is one atomic, special token.
    backend.add_special_tokens([tokenizers.AddedToken(c, special=True, **o) for c, o in [*named.values(), *extra]])
    clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
        type(backend.model).__name__ != "BPE"
        or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
    return CheckpointTokenizer(backend=backend, special_tokens={k: c for k, (c, _) in named.items()},
                               chat_template=read_chat_template(checkpoint_dir, config), clean_up_spaces=clean_up)


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    """``[{"role": "system", ...}, {"role": "user", "content": prompt}]`` (no system message when None).

    Raises:
        InputError: ``prompt`` is empty or only whitespace.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": prompt}]


# The Jinja environment. Imported lazily: only chat templates need jinja2.

def _chat_environment():
    """A sandboxed Jinja environment with transformers' chat-template settings (module docstring)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ChatTemplateError(f"rendering a chat template needs jinja2 ({exc}); "
                                "pip install 'jinja2>=3.1.6'") from None

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses the
        tag to mark assistant tokens; here only the text matters)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Namespace(jinja2.utils.Namespace):
        """Jinja's ``namespace`` without underscore-prefixed attributes (no path to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_attribute(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_attribute(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_attribute(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=_PlainDict(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class _PlainDict:
    """The template's ``dict``: builds dicts, exposes no other attribute of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         variables: dict) -> str:
    """Render ``template`` as transformers' ``apply_chat_template(..., tokenize=False)`` does.

    Args:
        template: Jinja source.
        messages: ``[{"role": ..., "content": ...}]``.
        add_generation_prompt: open an assistant turn at the end.
        variables: the named special tokens (strings) and any extra template variables
            (``enable_thinking``...); ``tools`` and ``documents`` are None.

    Raises:
        ChatTemplateError: the template does not compile, or raises while rendering
            (``raise_exception``, undefined names, sandbox violations), with its message.
    """
    import jinja2

    env = _chat_environment()
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile (line {exc.lineno}: {exc.message})") from None
    context = {"tools": None, "documents": None, **variables, "messages": messages,
               "add_generation_prompt": add_generation_prompt}
    try:
        return compiled.render(context)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template raised: {exc.message or type(exc).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
