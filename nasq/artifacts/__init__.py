"""Model artifacts: what a build produces and its key (``spec``), the build steps with their
numeric verification (``steps``, ``verify``), a build's life from task to task
(``pipeline``), and the directory of finished artifacts (``store``)."""
