"""`cliplora.loadtest`: interleaved load tests, statistics and reports proving "no overhead"."""
