"""The producer: shards a dataset into evaluation tasks and queues them on a running
deployment, then returns (``python -m producer --help``). Sharding and submission live in
``nasq.queue`` (``messages.make_manifest``, ``session.Session.submit_run``); this package
imports only nasq."""
