"""Load tests and latency comparisons (the loadtest issue builds `cliplora loadtest` here)."""
