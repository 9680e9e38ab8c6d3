"""Trace replay on a simulated cloud: our controller's decisions, the baselines and the
oracle, on the same simulated replicas, gateway and cloud; cost and SLO attainment.

Start from :func:`autoscaler.sim.run.compare` (every policy on one trace) or
:func:`autoscaler.sim.run.run_policy` (one). ``autoscaler simulate`` is the command.
"""
