"""Performance: timing (``timing``), ``nasq bench`` (``bench``) and sweep points (``sweep``)."""
