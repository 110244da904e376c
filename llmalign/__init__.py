"""llmalign: GRPO (grpo, dr_grpo, dapo, DisCO) and DPO-family trainers for text reasoning on transformers models.

Commands: `llmalign grpo | dpo | pairs | eval` (llmalign/cli.py). The trainers are llmalign/grpo.py and
llmalign/dpo.py; the losses, advantages and run handling they use are in `shared/`.
"""
