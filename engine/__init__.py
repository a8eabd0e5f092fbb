"""The Kontext editing engine: model loading, optimization variants, the edit call, the benchmark.

Import what you need from its modules (engine.engine, engine.requests, engine.loading, ...): this
file stays empty of imports so that the command line can start (and print --help) without torch.
"""

__version__ = "0.2.0"
