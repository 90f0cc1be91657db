"""Ray Serve application for recursive GPTs: budget router, per-tier model deployments (one continuous-batching
engine per replica), OpenAI-compatible HTTP API, chat page, and the `rnc serve` / `rnc chat` commands.

Modules without Ray (importable and testable anywhere): `config`, `router`, `protocol`, `service`, `generation`
(what crosses to a replica and back), `batcher` (the replica's engine loop), `engine_process` (that loop in a child
process), `loading`, `chat`. With Ray: `app` (deployments, `build_app`), `metrics`, `cli`.
"""
