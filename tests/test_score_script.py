import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.rewards.plugins import load_reward
from flowalign.rewards import jpeg_compressibility
from flowalign.score import load_batch, main
from tests.test_train_smoke import tiny_pipeline_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "a_flat.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "b_noise.png")
    (tmp_path / "prompts.txt").write_text("a grey square\nsome noise\n")
    return tmp_path


def test_scores_match_the_in_process_reward(folder, tmp_path, capsys):
    main(
        [
            "--reward",
            "flowalign.rewards:jpeg_compressibility",
            "--images",
            str(folder),
            "--prompts",
            str(folder / "prompts.txt"),
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "file,score" and [line.split(",")[0] for line in lines[1:]] == ["a_flat.png", "b_noise.png"]
    scores = [float(line.split(",")[1]) for line in lines[1:]]
    images = load_batch([folder / "a_flat.png", folder / "b_noise.png"])
    expected = jpeg_compressibility()(images, ["a grey square", "some noise"], [{}, {}])
    assert scores == pytest.approx(expected.tolist()) and scores[0] > scores[1]  # flat compresses better


def test_json_prompts_and_mismatched_counts(folder):
    (folder / "prompts.json").write_text(json.dumps({"a_flat.png": "x", "b_noise.png": "y"}))
    main(
        [
            "--reward",
            "flowalign.rewards:jpeg_compressibility",
            "--images",
            str(folder),
            "--prompts",
            str(folder / "prompts.json"),
            "--out",
            str(folder / "s.csv"),
        ]
    )
    assert (folder / "s.csv").read_text().startswith("file,score")
    (folder / "short.txt").write_text("only one\n")
    with pytest.raises(SystemExit, match="1 prompts for 2 images"):
        main(
            [
                "--reward",
                "flowalign.rewards:jpeg_compressibility",
                "--images",
                str(folder),
                "--prompts",
                str(folder / "short.txt"),
            ]
        )


def test_the_reward_template_loads_and_scores():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        reward = load_reward("reward_template:my_reward", {"target_brightness": 0.25})
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    torch.testing.assert_close(reward(images, ["a", "b"], [{}, {}]), torch.tensor([0.0, -0.5]))


def test_flow_heldout_script_equals_the_trainers_own_final_evaluation(tiny_pipeline_dir, tmp_path):  # noqa: F811
    """scripts/flow_heldout.py (the "400 images" scorer of docs/results.md) reloads a run's config and newest LoRA and
    must score the same held-out images as the run's last evaluation did."""
    import importlib.util
    import json

    from flowalign.train import train
    from tests.test_train_smoke import tiny_config

    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir, out, "train.iterations=1", "log.checkpoint_every=1", "data.eval_seeds=2"))
    spec = importlib.util.spec_from_file_location("flow_heldout", ROOT / "scripts" / "flow_heldout.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    scores = script.heldout(out, out / "config.json", seeds=2)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    evals = {k: v for k, v in last.items() if k.startswith("eval/")}
    assert evals and {k: scores[k] for k in evals} == pytest.approx(evals, abs=1e-6)
