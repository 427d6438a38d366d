"""Pool sizing policy, the AWS applier and the replay simulator (issues 5 and 6). Never imports torch.

- ``policy``: pure (system forecast, pool states, pools) -> Plan; ``placement`` and ``forecast_view``
  hold its least-cost split across shapes and its forecast reading.
- ``aws``: describe groups and apply a plan (the only module, with ``aws_bootstrap``, that calls AWS).
- ``aws_bootstrap``: create the fleet a ``fleet`` file describes; lifecycle-hook and protection calls.
- ``subpools`` / ``aws_subpools``: user sub-pools (pure plan; describe, create, resize, drain, delete).
- ``lease``: one scaler run applies at a time (a lease row in the forecast store; imports SQLAlchemy).
- ``local_endpoint``: a moto server on 127.0.0.1 for demos, tests and benchmarks.
"""
