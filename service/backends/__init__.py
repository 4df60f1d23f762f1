"""Runtimes behind one interface; see :mod:`service.backends.base`."""

from service.backends.base import Backend, BackendInfo, BackendUnavailable

__all__ = ["Backend", "BackendInfo", "BackendUnavailable"]
