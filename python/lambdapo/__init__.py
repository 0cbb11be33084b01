"""LambdaPO: a thin RL training loop for reasoning LLMs built on the ``lambdapo_ext`` ops.

Pairwise lambda advantages, semantic-density rewards and a PPO-clip policy loss
(see DESIGN.md); ``lambdapo.tasks`` holds the built-in tasks.
"""

__version__ = "0.1.0"
