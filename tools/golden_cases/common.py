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
    keyword parameters, JSON values only. For each of ``rounded_dtypes`` the generator
    also stores the op's result on the inputs rounded to that dtype, computed as
    the named variant rounds.
    """

    case_id: str
    description: str
    seed: int
    op: str
    params: dict
    make_inputs: Callable
    tolerance_class: str = "op_exact"
    #: low-precision dtypes whose exact rounding the case also records (``outputs.<name>@<dtype>``)
    rounded_dtypes: tuple[str, ...] = ()
