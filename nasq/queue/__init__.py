"""The queue-client layer: the Celery app and task names (``app``), message types with
validation (``messages``), everything kept in Redis (``store``), the session that submits
canvases and waits (``session``), and local clusters for embedded runs and tests (``local``)."""
