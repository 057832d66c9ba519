"""trmath inside existing RL trainers.

* :mod:`trmath.integrations.trl` -- a GRPO trainer for TRL whose loss is a trmath objective
  (:func:`~trmath.integrations.trl.trl_policy_loss` is the loss itself, usable without TRL).
* :mod:`trmath.integrations.verl` -- trmath objectives registered in verl's policy-loss registry
  under ``trmath_*`` names (:func:`~trmath.integrations.verl.register_verl_losses`).

Neither module imports its trainer at import time; TRL and verl are optional and only needed to
build the trainer subclass or to register the losses.

Examples
--------
>>> from trmath.integrations import verl, trl
>>> sorted(verl.VERL_LOSSES)[:2]
['cispo', 'dppo_binary_kl']
"""

from __future__ import annotations

__all__ = ["trl", "verl"]
