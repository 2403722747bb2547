"""ketch: a container supervisor that does containerd's job and speaks its protocols."""

__version__ = "0.1.0"
