"""mxsend's benchmark harness (scripts/bench): mxsend and Postfix side by side.

Same method as the Postfix baseline the project was given (docs/performance.md): one
deterministic workload, Postfix's own smtp-sink on loopback counting messages, Postfix
measured in the same run on the same messages, every route and lookup on loopback.
"""
