"""tmrl shared library: wire protocol, codecs and configuration shared by relay, worker and trainer.

Nothing in this package imports torch except :mod:`tmrl_common.networks`, which the relay never loads.
"""

__version__ = "0.1.0"
