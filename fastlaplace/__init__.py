"""fastlaplace: Bayesian gradient-based meta-learning (MAML and LLAMA) for PyTorch.

Implements "Recasting Gradient-Based Meta-Learning as Hierarchical Bayes" (Grant et al.,
ICLR 2018) on compiled K-FAC kernels (``fastlaplace.ops``).
"""

from . import ops, reference
from .meta import LLAMA, MAML, MetaLoss
from .models import conv4, resnet12, sinusoid_mlp
from .ops import damped_cholesky, has_cuda, kfac_logdet, kron_factors, kron_logdet

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "LLAMA",
    "MetaLoss",
    "sinusoid_mlp",
    "conv4",
    "resnet12",
    "ops",
    "reference",
    "kron_factors",
    "damped_cholesky",
    "kron_logdet",
    "kfac_logdet",
    "has_cuda",
]
