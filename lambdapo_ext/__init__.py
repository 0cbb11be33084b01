"""lambdapo_ext: fused, memory-lean ops for LambdaPO-style RL training of LLMs.

The compiled library (``lambdapo_ext._C``) registers the ops under ``torch.ops.lambdapo``.
This package imports without it (or with one built for another torch); calling an op then
raises one error that says how to rebuild.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lambdapo_ext._loader import build_info, library_error
from lambdapo_ext.advantages import lambda_advantages
from lambdapo_ext.logprobs import linear_token_logprobs, token_logprobs
from lambdapo_ext.overlap import lcs_length, ngram_overlap, rouge_l, rouge_n, semantic_density
from lambdapo_ext.policy_loss import linear_policy_loss

__all__ = [
    "__version__",
    "build_info",
    "lambda_advantages",
    "lcs_length",
    "library_error",
    "linear_policy_loss",
    "linear_token_logprobs",
    "ngram_overlap",
    "rouge_l",
    "rouge_n",
    "semantic_density",
    "token_logprobs",
]
