"""Graph passes and their numpy references (fused or memory-bounded ops)."""
