"""Pure decisions: values in, values out, ``now`` passed in. No clock, database or network.

* ``schedule``: is a scheduled workload active now, and when does that change.
* ``scaling``: how many replicas an autoscaling workload wants, from TTFT and load.
* ``placement``: which private worker or catalog offer the next replica goes to.
* ``budget``: may a launch happen under the workload, pool and fleet ceilings.
* ``plan``: the launches, drains and terminations that move the fleet to the desired count.

Every result carries its reason, for the decision log that ``autoscaler describe`` lists.
"""
