"""Buying and booting machines: AWS, GCP, private workers, this machine, a simulated cloud.

Every provider implements :class:`providers.base.Provider`; vendor errors are translated
into :mod:`providers.base`'s error tree at the boundary. Imports ``catalog`` only.
"""
