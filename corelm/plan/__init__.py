"""Hardware planning: formulas (pure functions of ModelConfig), the hardware catalog, the planner, and the bench.

``formulas``, ``hardware`` and ``planner`` never import torch; ``bench`` and ``plots`` do.
"""
