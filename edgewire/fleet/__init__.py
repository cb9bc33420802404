"""The operator's fleet tools: rendering device files before they ship (flash), and putting model
versions onto running devices and taking them back (push, status, history, rollout).

These sit above the shared contract in the core (:mod:`edgewire.delivery`, topics, envelopes):
they may use it, the core never uses them.
"""
