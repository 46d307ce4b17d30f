"""The semantic planner of full Bernini: Qwen2.5-VL + connector + ViT decoder + mask token (spec §3)."""
