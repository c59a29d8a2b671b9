"""HTTP service tests (embedded queue, tiny weights)."""
