"""nasq: distributed NASNet-Large evaluation and benchmarking on device-pinned Celery workers.

The library (this package) holds the model, data, backends, metrics, reports, Celery
configuration, API and CLI. ``producer`` (sharding, submission) and ``workers`` (Celery
tasks, device pinning) build on it; this package never imports them.
"""

__version__ = "0.1.0"
