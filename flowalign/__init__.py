"""flowalign: GRPO for flow-matching image models (Flow-GRPO, MixGRPO and Flash, TempFlow-GRPO) on diffusers."""
