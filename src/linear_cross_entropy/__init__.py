"""linear-cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without holding the logits."""

from ._version import __version__
from .functional import linear_cross_entropy
from .log_probs import token_log_probs
from .metrics import LinearCrossEntropyOutput, LossMetrics
from .module import LinearCrossEntropyLoss
from .options import LinearCrossEntropyOptions

__all__ = [
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOptions",
    "LinearCrossEntropyOutput",
    "LossMetrics",
    "linear_cross_entropy",
    "token_log_probs",
    "__version__",
]
