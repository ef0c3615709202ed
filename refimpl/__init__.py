"""llm-refimpl: executable NumPy specification of 2025 open-weight LLM architectures.

Public entry points:
    from_pretrained(path, dtype=np.float64, *, lazy=False) -> Model   (docs/checkpoints.md)
    Model(input_ids) -> logits; Model.forward(input_ids, return_hidden_states=True)
    ARCHITECTURES: the registry of supported ``architectures`` names.
"""

from .errors import RefimplError
from .model import Model, ModelOutput, from_pretrained
from .registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "Model", "ModelOutput", "RefimplError", "from_pretrained"]
__version__ = "0.1.0"
