"""Model backends, one small contract per family (VAD, turn end, ASR, ...).

Workers depend on the contract, not on a backend; fallbacks wrap backends.
"""
