"""The ``ketch`` command line (see :mod:`ketch.cli.main`)."""
