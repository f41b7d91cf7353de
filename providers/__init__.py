"""Provider API modules (sans-I/O), their declarations (``spec``, collected in ``registry``)
and the local simulator."""

__all__ = ()
