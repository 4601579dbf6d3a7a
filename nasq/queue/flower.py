"""The Celery app Flower runs with (`nasq flower`): the same broker and JSON-only settings."""
from ..config import load_settings
from .app import make_app

app = make_app(load_settings())
