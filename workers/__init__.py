"""Workers: Celery tasks that run the model, one process per device.

Start one with ``nasq worker --device cuda:0 --backend torch`` (or ``python -m workers``).
"""
