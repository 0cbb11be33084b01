"""Generation backends behind one interface (:class:`~.base.RolloutEngine`).

* :mod:`.transformers_engine`: samples with the policy model itself, so it always serves
  the current weights.
* :mod:`.vllm_engine`: a colocated vLLM engine that gets the weights pushed after every
  optimizer step.

:func:`.engines.build_engine` picks one from ``rollout.engine``. This package module only
names the shared types of :mod:`.base`, so importing them loads no engine.
"""

from .base import Rollout, RolloutEngine, RolloutEngineError, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "RolloutEngineError", "SamplingParams"]
