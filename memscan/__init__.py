"""memscan: how a language model memorizes, measured with nearest neighbours over its activations."""

__version__ = "0.1.0"
