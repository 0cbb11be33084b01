"""LambdaPO inside other training stacks, each behind its own install extra:

* :mod:`lambdapo.integrations.trl` (``pip install 'lambdapo[trl]'``): ``LambdaPOTrainer``,
  a drop-in for TRL's ``GRPOTrainer``, and ``LambdaPOConfig``.
* :mod:`lambdapo.integrations.verl` (``pip install 'lambdapo[verl]'``): the ``lambdapo``
  advantage estimator, registered with verl through its plugin entry point, and
  semantic-density rewards.

Neither TRL nor verl is imported until its module is.
"""
