"""The embedded masked-diffusion toy (llmalign.diffusion_toy): its training loss by hand, the quick build's files
(AutoModelForMaskedLM / AutoTokenizer reload it, the digest is recorded) and its `embedded:arith-mdm` name."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmalign import diffusion_toy, toy
from llmalign.toy import resolve_embedded
from shared.embedded import DIGEST_FILE, directory_digest

ROOT = Path(__file__).resolve().parents[1]


def test_completions_are_padded_with_eos_to_the_fixed_length():
    tokenizer = diffusion_toy.build_mdm_tokenizer()
    ids = diffusion_toy.completion_tokens(tokenizer, "<answer>7</answer>", length=24)
    assert len(ids) == 24 and tokenizer.decode(ids[:18]) == "<answer>7</answer>"
    assert ids[18:] == [tokenizer.eos_token_id] * 6  # its EOS, then EOS padding: the model learns where it ends
    with pytest.raises(ValueError, match="more than L"):
        diffusion_toy.completion_tokens(tokenizer, "x" * 30, length=24)


def test_masked_diffusion_loss_by_hand():
    tokenizer = diffusion_toy.build_mdm_tokenizer()
    model = diffusion_toy.build_model(tokenizer, hidden=32, layers=1, seed=0).eval()
    prompt, completion = diffusion_toy.sft_batch(tokenizer, toy.make_split(3, 0))  # [3, P], [3, L]
    loss = diffusion_toy.masked_diffusion_loss(
        model, prompt, completion, tokenizer.mask_token_id, torch.Generator().manual_seed(4)
    )
    # the same draws by hand: t per sequence, then the mask; -log p / t over masked tokens, / (N * L)
    generator = torch.Generator().manual_seed(4)
    eps = diffusion_toy.MIN_MASK_RATIO
    t = eps + (1 - eps) * torch.rand(3, generator=generator)
    masked = torch.rand(completion.shape, generator=generator) < t[:, None]
    total = 0.0
    for i in range(3):
        noisy = [tokenizer.mask_token_id if m else c for c, m in zip(completion[i].tolist(), masked[i].tolist())]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt[i].tolist() + noisy])).logits[0, prompt.shape[1] :]
        logp = torch.log_softmax(logits, -1)
        total += sum(
            -logp[j, completion[i, j]].item() / t[i].item() for j in range(completion.shape[1]) if masked[i, j]
        )
    assert masked.any() and not masked.all()
    assert loss.item() == pytest.approx(total / completion.numel(), rel=1e-5)


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("mdm") / "quick"
    torch.manual_seed(0)
    report = diffusion_toy.build_mdm_model(out, mode="quick", progress=False)
    return out, report


def test_quick_build_reloads_with_the_auto_classes(quick_build):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out, report = quick_build
    assert diffusion_toy.is_complete(out)
    assert (out / DIGEST_FILE).read_text().strip() == directory_digest(out)
    model = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "BertForMaskedLM" and (out / "model.safetensors").is_file()
    assert tokenizer.mask_token == diffusion_toy.MASK_TOKEN and tokenizer.mask_token_id == len(tokenizer) - 1
    assert json.loads((out / "llmalign.json").read_text()) == report
    assert 0.0 <= report["test_greedy_accuracy"] <= 1.0 and report["sizes"] == diffusion_toy.BUILD_SIZES["quick"]
    # the same splits as the causal toy (seed 0): the data of embedded:arith/train.jsonl and test.jsonl
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    sft = toy.make_split(toy.TRAIN_PROBLEMS, 0)
    expected = toy.make_split(toy.TEST_PROBLEMS, 1, exclude={p["prompt"] for p in sft})
    assert rows == [{"prompt": p["prompt"], "answer": p["answer"]} for p in expected]


def test_embedded_name_is_the_shipped_build_and_it_reads_its_reported_accuracy():
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from llmalign.diffusion import DiffusionSampler
    from llmalign.evaluate import accuracy_on

    shipped = diffusion_toy.SHIPPED_DIR
    assert resolve_embedded("embedded:arith-mdm") == str(shipped)  # no build, no cache
    assert resolve_embedded("embedded:arith-mdm/test.jsonl") == str(shipped / "test.jsonl")
    assert directory_digest(shipped) == diffusion_toy.SHIPPED_DIGEST
    results = (ROOT / "docs" / "results.md").read_text()
    assert f"`{diffusion_toy.CACHE_NAME}` {diffusion_toy.SHIPPED_DIGEST}" in results
    report = json.loads((shipped / "llmalign.json").read_text())
    assert report["sizes"] == diffusion_toy.BUILD_SIZES["full"]
    # its held-out greedy accuracy, measured again: the build's figure, and between the bar and saturation
    model, tokenizer = AutoModelForMaskedLM.from_pretrained(shipped), AutoTokenizer.from_pretrained(shipped)
    test = [json.loads(line) for line in (shipped / "test.jsonl").read_text().splitlines()]
    sampler = DiffusionSampler(tokenizer, diffusion_toy.SAMPLER_STEPS, "max_prob", model)
    torch.set_num_threads(1)
    greedy = accuracy_on(model, tokenizer, test, diffusion_toy.COMPLETION_LENGTH, batch_size=100, engine=sampler)
    assert greedy["accuracy"] == pytest.approx(report["test_greedy_accuracy"], abs=0.01)
    assert diffusion_toy.QUALITY_BAR["test_greedy_accuracy"] <= greedy["accuracy"] <= 0.9


def test_a_shipped_copy_that_differs_gives_way_to_the_cached_build(quick_build, tmp_path, monkeypatch):
    out, _ = quick_build
    monkeypatch.setenv("FLOWALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(diffusion_toy, "SHIPPED_DIGEST", "sha256:" + "0" * 64)
    shutil.copytree(out, diffusion_toy.default_cache_dir())  # a complete build with its digest: used, not rebuilt
    assert resolve_embedded("embedded:arith-mdm") == str(diffusion_toy.default_cache_dir())
    assert resolve_embedded("embedded:arith-mdm/test.jsonl") == str(diffusion_toy.default_cache_dir() / "test.jsonl")
    assert resolve_embedded("embedded:arith-mdmx") == "embedded:arith-mdmx"  # another name: unchanged
