"""The controller and the control plane.

``spec`` is the contract users write; ``store`` keeps state; ``decide`` holds the pure
decisions and ``reconcile`` the loops that carry them out; ``api`` is the management
HTTP API, ``sdk`` its Python client and ``cli`` the ``autoscaler`` command.
"""

__version__ = "0.1.0"
