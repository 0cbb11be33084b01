"""lambdapo: the LambdaPO training loop (generation, rewards, advantages, PPO-clip loss on
the fused ops of ``lambdapo_ext``), its command line and adapters for TRL and verl."""

__version__ = "0.1.0"
