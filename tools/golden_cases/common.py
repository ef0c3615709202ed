"""Case descriptions shared by the golden case modules (see ``tools/golden_cases/__init__.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class _JsonNull:
    """The type of :data:`JSON_NULL` (one instance)."""

    def __repr__(self) -> str:
        return "JSON_NULL"


#: A config value written to config.json as an explicit ``null``. A plain None leaves
#: the key out (the architecture's default applies); ``JSON_NULL`` keeps the key with
#: value null (e.g. DeepSeek's ``q_lora_rank: null`` means q_proj, absent means 1536).
JSON_NULL = _JsonNull()


@dataclass(frozen=True)
class ModelCase:
    """One model-level golden case: a config, a seed and an input shape."""

    case_id: str
    description: str
    seed: int
    config: dict
    batch: int
    seq: int
    tolerance_class: str = "model_logits"
    #: multipliers for weights whose name contains the key, applied after drawing
    weight_scales: dict = field(default_factory=dict)
    #: also write the checkpoint's multi-token-prediction depths (``num_nextn_predict_layers``
    #: of the config) and their draft logits ``mtp_logits.{k}`` (``Architecture.mtp``)
    mtp: bool = False
    #: ``(weights, rng) -> weights``: the tensors as the checkpoint stores them, given the drawn
    #: float32 ones (``make_goldens.random_weights``, the reference's names): renames, and the
    #: copies and unread tensors a published checkpoint carries. ``rng`` is a stream of its own
    #: (seed + 20000), so the drawn tensors keep their values. None: stored as drawn.
    checkpoint_layout: Callable | None = None
    #: ``(rng, batch, seq) -> int64 (B, T)`` input ids from the generator's id stream (seed + 10000);
    #: None: uniform over ``[0, vocab_size)``.
    make_input_ids: Callable | None = None


@dataclass(frozen=True)
class OpCase:
    """One op-level golden case: an op of ``refimpl.ops.OPS``, its inputs and parameters.

    ``make_inputs(rng)`` returns ``{argument: array}`` (float64, or int64 for integer
    arguments) drawn from ``np.random.default_rng(seed)``; ``params`` are the
    keyword parameters, JSON values only. For a case of ``tolerance_class``
    ``"op_elementwise"`` the generator also stores the reference's result on the inputs
    cast to each of float32, float16 and bfloat16, computed as the named variant rounds
    (``outputs.<name>@<dtype>``: the ULP rule of ``conformance.tolerances``).
    """

    case_id: str
    description: str
    seed: int
    op: str
    params: dict
    make_inputs: Callable
    tolerance_class: str = "op_exact"


def prefill(num_tokens: int) -> dict:
    """A scenario schedule step: the prompt, ``num_tokens`` slots per row (left padding included)."""
    return {"op": "prefill", "num_tokens": num_tokens}


def decode(num_tokens: int = 1) -> dict:
    """A scenario schedule step: ``num_tokens`` new tokens per row (several: a chunked-prefill
    piece or a speculative verification)."""
    return {"op": "decode", "num_tokens": num_tokens}


def rollback(num_tokens: int) -> dict:
    """A scenario schedule step: forget the last ``num_tokens`` tokens of every row (rejected drafts)."""
    return {"op": "rollback", "num_tokens": num_tokens}


@dataclass(frozen=True)
class ScenarioCase:
    """One scenario golden case: a checkpoint, a schedule of incremental calls and their tokens.

    The checkpoint is either a model case's (``checkpoint_of``: its id; the scenario's manifest
    entry points at that case's checkpoint folder) or the scenario's own, drawn from ``config``
    and ``seed`` like a :class:`ModelCase`'s (``weight_scales`` as there). Exactly one of the two.

    ``schedule`` lists :func:`prefill` (first, once), :func:`decode` and :func:`rollback`
    steps. Tokens come from ``np.random.default_rng(seed)``, one draw of ``(B, n)`` per prefill
    or decode step in schedule order (pad slots too: their ids are arbitrary), unless
    ``make_tokens(rng, index, shape, vocab_size, history)`` returns them: ``index`` is the
    step's place in the schedule, ``shape`` is ``(B, n)``, ``history`` holds each row's real
    tokens so far (after rollbacks) as int64 arrays; it returns int ``(B, n)``.

    ``left_padding[b]`` pad slots open row b's prompt (empty: no padding); the generator stores
    the attention mask, and each token's position is ``cumsum(mask) - 1``.
    """

    case_id: str
    description: str
    seed: int
    schedule: tuple
    batch: int = 1
    left_padding: tuple = ()
    checkpoint_of: str | None = None
    config: dict | None = None
    tolerance_class: str = "model_logits"
    weight_scales: dict = field(default_factory=dict)
    make_tokens: Callable | None = None
    #: as :class:`ModelCase`; scenarios never write MTP depths or another layout
    mtp: bool = False
    checkpoint_layout: Callable | None = None

    def __post_init__(self):
        if (self.checkpoint_of is None) == (self.config is None):
            raise ValueError(f"{self.case_id}: give exactly one of checkpoint_of and config")
        if self.left_padding and len(self.left_padding) != self.batch:
            raise ValueError(f"{self.case_id}: left_padding needs one entry per row ({self.batch})")
