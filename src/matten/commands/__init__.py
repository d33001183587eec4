"""Sub-commands of the ``matten`` command line, one module each."""
