"""The ``llm-refimpl`` command (also ``python -m refimpl.cli``).

    llm-refimpl generate CHECKPOINT_DIR --prompt TEXT [--max-new-tokens 32]
                         [--dtype float32|float64] [--chat/--no-chat] [--system TEXT]
                         [--template-var KEY=VALUE ...] [--stop/--no-stop]
                         [--compare-transformers] [--json]

``generate`` tokenizes the prompt with the checkpoint's ``tokenizer.json`` (through
its chat template when it has one, unless ``--no-chat``), decodes greedily with the
NumPy reference and prints the new text. ``--compare-transformers`` also runs
transformers' ``generate(do_sample=False)`` on the same ids and prints, per step,
both chosen ids and the logit error while the two runs share a prefix, then
``agree for N steps`` or the first step where they differ.

Exit status: 0 (with ``--compare-transformers``: and the runs agree), 1 when the
two runs differ, 2 for usage and input errors (missing tokenizer.json, unknown
architecture, empty prompt, ``--max-new-tokens`` below 1, prompt ids beyond the
model's vocabulary, a chat template that raises...), printed as one line
``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .checkpoint import read_config, read_json
from .errors import InputError, RefimplError
from .generate import (Generation, GenerationComparison, cached_next_logits, compare_generations,
                       greedy_generate, normalise_stop_ids)
from .model import from_pretrained
from .registry import get_architecture
from .tokenizer import CheckpointTokenizer, chat_messages, load_tokenizer

EXIT_DIFFERENT = 1
EXIT_INPUT_ERROR = 2
GENERATION_CONFIG_FILE = "generation_config.json"
#: template variables the command sets (``messages`` from --prompt and --system).
RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "tools", "documents")


def one_line(text: str) -> str:
    """``text`` with its lines joined, for messages that must fit one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _input_errors_as_one_line(command):
    """Turn RefimplError into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RefimplError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(EXIT_INPUT_ERROR)

    return wrapper


def _parse_template_vars(ctx, param, values: tuple[str, ...]) -> dict:
    """``("k=v", ...)`` to ``{"k": v}``, v read as JSON when it parses (``false``, ``3``), else a string."""
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected NAME=VALUE, got '{item}'", ctx=ctx, param=param)
        if key in RESERVED_TEMPLATE_VARS:
            raise click.BadParameter(f"'{key}' is set by the command itself", ctx=ctx, param=param)
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def stop_ids_of(checkpoint_dir: Path, raw_config: dict) -> tuple[int, ...]:
    """The ids that end generation: ``eos_token_id`` of generation_config.json, else of config.json.

    Raises:
        InputError: an ``eos_token_id`` that is not an int or a list of ints.
        CheckpointError: generation_config.json is not a JSON object.
    """
    path = Path(checkpoint_dir) / GENERATION_CONFIG_FILE
    generation = read_json(path) if path.is_file() else {}
    if generation.get("eos_token_id") is not None:
        return normalise_stop_ids(generation["eos_token_id"], GENERATION_CONFIG_FILE)
    return normalise_stop_ids(raw_config.get("eos_token_id"), "config.json")


def prompt_ids_of(tokenizer: CheckpointTokenizer, prompt: str, chat: bool | None, system: str | None,
                  template_vars: dict) -> tuple[np.ndarray, str | None]:
    """``(ids (T0,), rendered prompt or None)``: the chat template over a user turn (and a
    system turn) when ``chat`` (None: when the checkpoint has a template), else the raw
    prompt with the post-processor's special tokens.

    Raises:
        InputError: an empty prompt, ``--system`` or ``--template-var`` without a chat
            template, or a prompt the tokenizer turns into no token.
        TokenizerError / ChatTemplateError: ``--chat`` without a template; a template that raises.
    """
    messages = chat_messages(prompt, system)
    use_chat = tokenizer.chat_template is not None if chat is None else chat
    if not use_chat and (system is not None or template_vars):
        raise InputError("--system and --template-var need the chat template (the prompt is used as is)")
    if use_chat:
        rendered = tokenizer.render_chat(messages, add_generation_prompt=True, **template_vars)
        ids = tokenizer.encode(rendered, add_special_tokens=False)
    else:
        rendered, ids = None, tokenizer.encode(prompt)
    if ids.size == 0:
        raise InputError("the tokenizer turns the prompt into no token")
    return ids, rendered


def check_ids_in_vocab(ids: np.ndarray, vocab_size: int, tokenizer: CheckpointTokenizer) -> None:
    """Refuse prompt ids the model has no embedding for.

    Raises:
        InputError: the first id >= ``vocab_size``, with its token and position.
    """
    bad = np.flatnonzero(ids >= vocab_size)
    if bad.size:
        at = int(bad[0])
        raise InputError(f"the tokenizer gives token id {int(ids[at])} ({tokenizer.token_text(ids[at])!r}) at prompt "
                         f"position {at}, beyond the model's vocab_size {vocab_size}")


@contextlib.contextmanager
def _transformers_quiet(transformers):
    """transformers' warnings and progress bars off while it runs here (our output is the report)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def transformers_generation(checkpoint_dir: Path, prompt_ids: np.ndarray, max_new_tokens: int,
                            stop_ids: tuple[int, ...]) -> tuple[Generation, dict]:
    """transformers' greedy ``generate`` in float32 on the same ids, with the same stopping.

    The model is ``AutoModelForCausalLM`` loaded as the conformance transformers backend
    loads it (float32, eager attention, eager experts). Its ``generation_config`` is
    replaced by a plain one holding only the stop ids, so that sampling settings or
    logits processors of the checkpoint's generation_config.json do not apply; the
    logits recorded are ``generate``'s raw ``output_logits``. transformers decodes with
    its KV cache, the reference re-runs the full forward.

    Returns:
        ``(Generation, {"torch": version, "transformers": version})``.

    Raises:
        RefimplError: torch or transformers missing, or transformers cannot load the checkpoint.
    """
    # The conformance backend owns every import of torch; the reference never imports it.
    from conformance.backends.transformers_backend import TransformersBackend
    from conformance.errors import ConformanceError

    try:
        backend = TransformersBackend()
    except ConformanceError as exc:
        raise RefimplError(f"--compare-transformers: {exc}") from None
    torch, transformers = backend.torch, backend.transformers
    from conformance.backends.transformers_backend import _known_architectures

    from .checkpoint import read_config

    architecture = (read_config(checkpoint_dir).get("architectures") or [None])[0]
    if architecture not in _known_architectures(transformers):
        # Grok's model_type "git" would otherwise load transformers' unrelated GitForCausalLM.
        raise RefimplError(f"--compare-transformers: transformers {transformers.__version__} has no model class "
                           f"'{architecture}'; there is nothing to compare with (the reference alone runs it)")
    with _transformers_quiet(transformers):
        try:
            model = backend.load_model(checkpoint_dir, "float32").model
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise RefimplError(f"--compare-transformers: transformers cannot load {checkpoint_dir} ({exc})") from None
        model.generation_config = transformers.GenerationConfig(
            eos_token_id=list(stop_ids) or None, pad_token_id=stop_ids[0] if stop_ids else 0)
        ids = torch.from_numpy(prompt_ids[None, :].astype(np.int64))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, prompt_ids.size:].numpy().astype(np.int64)
    logits = np.stack([step[0].double().numpy() for step in out.logits])
    reason = "eos" if new.size and int(new[-1]) in stop_ids else "max_new_tokens"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return Generation(prompt_ids, new, logits, reason), versions


def _token_cell(tokenizer: CheckpointTokenizer, token_id: int | None) -> str:
    if token_id is None:
        return "(stopped)"
    text = tokenizer.token_text(token_id)
    return f"{token_id} {text!r}" if text is not None else f"{token_id} (no token)"


def _error_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def comparison_lines(comparison: GenerationComparison, tokenizer: CheckpointTokenizer) -> list[str]:
    """The per-step table and the summary line printed by ``--compare-transformers``."""
    cells = [("step", "refimpl", "transformers", "max |dlogit|", "rel RMS")]
    cells += [(str(r.step), _token_cell(tokenizer, r.ours), _token_cell(tokenizer, r.theirs),
               _error_cell(r.max_abs), _error_cell(r.rel_rms)) for r in comparison.steps]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    return lines + [f"refimpl vs transformers: {comparison.summary()}"]


def _comparison_json(comparison: GenerationComparison, theirs: Generation, tokenizer: CheckpointTokenizer,
                     versions: dict) -> dict:
    return {
        "dtype": "float32", **versions, "generated_ids": theirs.new_ids.tolist(),
        "text": tokenizer.decode(theirs.new_ids),
        "stop_reason": theirs.stop_reason, "agree": comparison.agree, "first_difference": comparison.first_difference,
        "summary": comparison.summary(),
        "steps": [{"step": r.step, "refimpl": r.ours, "transformers": r.theirs, "max_abs_logit_error": r.max_abs,
                   "rel_rms": r.rel_rms} for r in comparison.steps],
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm-refimpl")
def cli():
    """Run the NumPy reference on a checkpoint."""


@cli.command("generate")
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The user's text.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate at most (>= 1).")
@click.option("--dtype", type=click.Choice(("float32", "float64")), default="float32", show_default=True,
              help="Compute dtype of the reference (transformers, with --compare-transformers, runs float32).")
@click.option("--chat/--no-chat", default=None,
              help="Render the prompt with the checkpoint's chat template (default: when it has one).")
@click.option("--system", default=None, help="A system message before the prompt (chat template only).")
@click.option("--template-var", "template_vars", multiple=True, callback=_parse_template_vars,
              metavar="NAME=VALUE", help="Extra chat template variable, VALUE read as JSON if it parses "
                                         "(enable_thinking=false); repeatable.")
@click.option("--stop/--no-stop", default=True, show_default=True,
              help="Stop at eos_token_id (generation_config.json, else config.json; an int or a list).")
@click.option("--compare-transformers", is_flag=True,
              help="Also run transformers' greedy generate (float32) and report per step where they differ.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_input_errors_as_one_line
def generate_command(checkpoint_dir, prompt, max_new_tokens, dtype, chat, system, template_vars, stop,
                     compare_transformers, as_json):
    """Greedy generation from CHECKPOINT_DIR (config.json, safetensors, tokenizer.json)."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    chat_messages(prompt, system)
    # Cheap checks first: the architecture and the tokenizer before any weight is read.
    raw = read_config(checkpoint_dir)
    arch = get_architecture(raw)
    tokenizer = load_tokenizer(checkpoint_dir)
    prompt_ids, rendered = prompt_ids_of(tokenizer, prompt, chat, system, template_vars)
    check_ids_in_vocab(prompt_ids, arch.config_class.from_dict(raw).vocab_size, tokenizer)
    stop_ids = stop_ids_of(checkpoint_dir, raw) if stop else ()
    model = from_pretrained(checkpoint_dir, dtype=np.dtype(dtype))
    ours = greedy_generate(cached_next_logits(model), prompt_ids, max_new_tokens, stop_ids)
    comparison = theirs = None
    if compare_transformers:
        theirs, versions = transformers_generation(checkpoint_dir, prompt_ids, max_new_tokens, stop_ids)
        comparison = compare_generations(ours, theirs)
    text = tokenizer.decode(ours.new_ids)
    if as_json:
        report = {
            "checkpoint": str(checkpoint_dir), "architecture": arch.name, "dtype": dtype, "chat": rendered is not None,
            "prompt": prompt, "rendered_prompt": rendered, "prompt_ids": prompt_ids.tolist(),
            "stop_ids": list(stop_ids), "generated_ids": ours.new_ids.tolist(), "text": text,
            "stop_reason": ours.stop_reason,
            "transformers": None if comparison is None else _comparison_json(comparison, theirs, tokenizer, versions),
        }
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(text)
        for line in comparison_lines(comparison, tokenizer) if comparison is not None else ():
            click.echo(line)
    if comparison is not None and not comparison.agree:
        sys.exit(EXIT_DIFFERENT)


def main() -> None:
    """Console-script entry point: usage errors are one ``error:`` line and exit status 2."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
    try:
        cli.main(prog_name="llm-refimpl", standalone_mode=False)
    except no_args as exc:
        click.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc))
        sys.exit(EXIT_INPUT_ERROR)
    except click.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        sys.exit(EXIT_INPUT_ERROR)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_DIFFERENT)


if __name__ == "__main__":
    main()
