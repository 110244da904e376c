"""Held-out accuracy after TRL's DPOTrainer on a pairs file, scored exactly as `llmalign dpo` scores its runs.

The cross-check behind the DPO results in docs/results.md: if DPO lowers held-out accuracy on the embedded task, is it
the method or our trainer? Same pairs, same settings, same evaluation (llmalign.evaluate.held_out_metrics,
same seeds) on both sides:

    llmalign pairs --model embedded:arith --data embedded:arith/train.jsonl --out runs/arith_pairs.jsonl \\
                   --group-size 8 --max-new-tokens 80
    llmalign dpo --config configs/llm/arith_dpo.yaml algorithm.loss=sigmoid algorithm.beta=0.1 \\
                 train.learning_rate=3e-5 train.epochs=2 train.warmup_steps=0 data.eval_samples=4 log.eval_every=0
    python benchmarks/trl_dpo_accuracy.py --pairs runs/arith_pairs.jsonl --learning-rate 3e-5 --epochs 2

TRL is installed into .bench/trl as for trl_bench.py (not a project dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import trl_bench  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="prompt/chosen/rejected JSONL, e.g. from `llmalign pairs`")
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--eval-samples", type=int, default=4, help="draws per held-out problem (as data.eval_samples)")
    args = parser.parse_args(argv)
    if trl_bench.ensure_trl() is None:
        print("TRL is not installed and could not be installed; run: bash benchmarks/setup_trl.sh")
        return {}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmalign.evaluate import held_out_metrics
    from llmalign.toy import ensure_arith_model

    root = ensure_arith_model()
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    rows = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(root)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32)
    trl_bench.DPO.update(learning_rate=args.learning_rate)  # batch 32, beta 0.1, sigmoid: as the llmalign command above
    steps = math.ceil(args.epochs * len(rows) / trl_bench.DPO["batch_size"])
    trainer = trl_bench.trl_dpo_trainer(
        model, None, tokenizer, rows, str(ROOT / "benchmarks" / "out" / "trl_dpo"), steps, precompute=True
    )
    trainer.train()
    test = [json.loads(line) for line in (Path(root) / "test.jsonl").read_text().splitlines()][:200]
    tokenizer.padding_side = "left"
    result = held_out_metrics(model.eval(), tokenizer, test, 80, 1.0, args.eval_samples, seed=12345)  # llmalign's seed
    print(
        f"TRL DPOTrainer, {len(rows)} pairs, {steps} steps at lr {args.learning_rate}: greedy "
        f"{result['eval/accuracy']:.3f}, sampled {result['eval/sampled_accuracy']:.3f} "
        f"(T=1, mean of {args.eval_samples} draws)"
    )
    return result


if __name__ == "__main__":
    main()
