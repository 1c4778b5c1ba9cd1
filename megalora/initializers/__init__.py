"""LoRA initializers computed from the base model (PiSSA, OLoRA, LoftQ; CorDA and EVA).

``distributed`` runs a decomposition of each layer's full base weight on one
owner rank and scatters the factors (and rewritten base shards) back, at any
TP/PP/DP layout; the other modules hold each method's math as pure functions.
"""
