"""The local stack of `cliplora serve`: Triton and Prometheus as supervised children, with
the gateway (`cliplora.serve.gateway`) in front.

`run` starts and stops it all in order; `supervisor` restarts a child that exits or hangs;
`processes` is the one lifecycle of a guarded child (`GuardedChild`), which
`triton_launcher` and `prometheus` specialise; `child_guard` is the small process between
the stack and each child that keeps the child from outliving it.
"""
