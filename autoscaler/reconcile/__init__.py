"""Level-based loops that read state, call ``decide`` and carry out its actions."""
