"""The runtimes in use, behind the one interface of :mod:`export.runtime`; :mod:`service.backends.factory` maps
configuration strings to them."""
