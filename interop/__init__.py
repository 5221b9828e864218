"""Interop tests: muxproxy in front of a real nginx (h2c and TLS h2), as subprocesses."""
