"""Hypothesis profiles of the property tests (tests/property).

Every run is reproducible: examples come from a fixed seed (``derandomize``), and
nothing is stored between runs (no example database), so CI sees the same draws
each time. Two budgets:

- ``mmssm-ci`` (default): the default test tier; each test draws the few examples
  it asks for through :func:`prop_common.budget`.
- ``mmssm-slow``: ten times as many examples; selected with
  ``HYPOTHESIS_PROFILE=mmssm-slow`` (the slow tier's
  ``test_property_suite_with_the_large_budget`` runs this folder that way).
- ``mmssm-explore``: many draws without shrinking, for looking for bugs by hand.
"""
import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile('mmssm-ci', max_examples=10, **_COMMON)
settings.register_profile('mmssm-slow', max_examples=100, **_COMMON)
# for hunting bugs by hand: many draws, report the first failure without shrinking it
settings.register_profile('mmssm-explore', max_examples=100,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'mmssm-ci'))
