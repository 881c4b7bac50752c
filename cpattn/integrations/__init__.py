"""Integrations of cpattn with model frameworks, each behind its own optional extra.

* :mod:`cpattn.integrations.transformers` (``pip install cpattn[transformers]``):
  ``ContextParallelLM``, greedy generation of Hugging Face transformers models with PCP prefill,
  the PCP -> DCP cache hand-off and DCP decode. See ``docs/integrations.md``.

Importing this package never imports a framework; ``import cpattn`` works without any of them.
"""
