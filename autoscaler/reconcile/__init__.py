"""Reconcilers: level-based loops that carry the pure decisions out.

Each pass reads the ledger, what the providers show and what the gateway measured, calls
``autoscaler.decide``, and acts: the provisioner buys (intent row first), liveness
watches engines come up and die, drain lets requests finish before terminating, and the
orphan sweep terminates tagged instances the ledger does not know. Every dependency is
explicit (:class:`~autoscaler.reconcile.deps.Deps`): the store's sessions, the provider
registry, a :class:`providers.base.Clock`, a signals source and a health checker, so the
trace simulator drives the same code with a simulated clock and cloud.

Entry point: :func:`autoscaler.reconcile.loop.reconcile_once`.
"""
