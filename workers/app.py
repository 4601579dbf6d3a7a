"""The worker's Celery app, configured from the environment, with the tasks registered."""
from nasq.celery_app import make_app
from nasq.config import load_settings

settings = load_settings()
app = make_app(settings)

import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
import workers.build_tasks  # noqa: E402,F401
