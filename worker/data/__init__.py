"""The data side, no TensorFlow: filesystems and model fetching, input planning (``dataset``), ``decode``,
the output ``schema``, the output directory and its datasink (``sink``, ``lease``) and per-map ``stats``.
These run in Ray's CPU tasks and in the driver."""
