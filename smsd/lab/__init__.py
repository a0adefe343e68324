"""The lab: tools built around the daemon, never imported by it.

The local OpenAI-compatible server (``llmserver``), the benchmarks
(``bench``), the kill -9 drill (``drill``), the demo (``demo``), the offline
extractor's scoring (``evaluate``) and the invariant checker
(``invariants``) that tests, drills and the demo share.  Only ``smsd.cli``
reaches in here, lazily, to dispatch a subcommand.
"""
