"""`reconcile worker`: the data steps as jobs on procrastinate, on the state store's
PostgreSQL (`queue`: the reconciler's side; `worker`: the worker process; `fleet`: the
limits every worker shares)."""
