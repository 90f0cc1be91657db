"""Ray Serve application for recursive GPTs: budget router, per-tier model deployments, OpenAI-compatible HTTP API,
chat page, and the `rnc serve` / `rnc chat` commands.

Modules without Ray (importable and testable anywhere): `config`, `router`, `protocol`, `service`,
`engine_adapter`, `loading`, `chat`. With Ray: `app` (deployments, `build_app`), `metrics`, `cli`.
"""
