"""llmalign: GRPO and DPO-family trainers for text reasoning on transformers models.

Not built yet (issues 4 and 5); the shared math it will use is in `shared/`.
"""
