"""The engine: TensorFlow only, no Ray, no Parquet.  Layered like Keras, ops to methods:

``ops`` (gradient overrides) -> ``preprocessing``, ``reduction``, ``targets`` -> ``models`` (loading),
``coverage``, ``runtime`` -> ``methods/`` (a small base and one file per method).

The user-facing names are exported lazily by :mod:`worker` (``from worker import GuidedBackprop``).
"""
