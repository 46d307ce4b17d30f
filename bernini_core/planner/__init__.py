"""The semantic planner of full Bernini: Qwen2.5-VL + connector + ViT decoder + mask token
(docs/official_behaviour.md §3)."""
