"""Multi-process serving: `fundus serve --workers N` with one shared model process (real processes)."""
