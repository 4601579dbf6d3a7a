"""Running the model over images: an index range of a dataset (``evaluate``), one shard of a
run with its bookkeeping (``shard``), and what a worker process keeps loaded (``resources``)."""
