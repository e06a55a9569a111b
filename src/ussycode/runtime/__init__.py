"""VM backends. Each implements :class:`ussycode.runtime.base.Runtime`."""
