"""Cluster mode: several replicas of `parley run` on one PostgreSQL store and one Redis.

Every part is an existing engine; the code here is the glue:

- `queue`: each conversation's messages are worked through by one procrastinate job at
  a time (`lock=<conversation key>`), on whichever replica's worker fetched it; worker
  heartbeats and the stalled-job retry move a dead replica's conversations on.
- `budgets`: the platforms' outbound rate budgets, shared through Redis with `limits`.
- `leader`: the one replica that polls Telegram, elected with a PostgreSQL advisory lock.
- `member`: what a connector is given in cluster mode (`ClusterMember`): its leadership
  for a duty, and "once for the cluster" for shared platform settings (Telegram's webhook).
- `pg`: the dedicated, named PostgreSQL connections and schema-scoped lock names both use.

SQLite mode stays one process and does not import this package.
"""
