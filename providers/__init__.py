"""Provider API modules (sans-I/O) and the local simulator."""
