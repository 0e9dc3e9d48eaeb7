"""Routing rules: a model's node policy, its weighted variants, its overflow endpoint.

`config` reads the ``routing:`` section; `policies` chooses a node (round robin, prefix affinity),
`split` a variant, `overflow` when a request leaves for the remote endpoint; `router` applies the
entries to the scheduler's routes and changes them at run time. docs/routing.md says why.
(``shardon.config`` imports `config`, so this package imports none of its modules itself.)
"""
