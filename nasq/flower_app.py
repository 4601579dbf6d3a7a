"""The Celery app Flower runs with (`nasq flower`): the same broker and JSON-only settings."""
from .celery_app import make_app
from .config import load_settings

app = make_app(load_settings())
