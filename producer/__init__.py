"""The producer: shards a dataset into evaluation tasks and queues them on a running
deployment, then returns (``python -m producer --help``). Sharding lives in
``nasq.rundata`` (``RunManifest.plan``) and submission in ``nasq.queue``
(``session.Session.submit_run``); this package imports only nasq."""
