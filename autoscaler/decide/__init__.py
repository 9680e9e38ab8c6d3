"""Pure decisions: values in, values out, ``now`` passed in. No clock, database or network."""
