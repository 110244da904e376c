"""Preference optimization for flow-matching image models: Diffusion-DPO and SmPO-Diffusion, on-policy or from a
file of pairs.

    python flowalign/preference.py --config configs/flow/diffusion_dpo.yaml [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 flowalign/preference.py --config configs/flow/smpo.yaml
    python flowalign/preference.py --describe            # every config field, documented

Each iteration: pairs -> loss (shared/preference.py) -> optimizer step(s) -> log -> checkpoint.
- On-policy pairs (the default): G ODE samples per prompt from the current model (the adapter's sampler),
  scored by the configured rewards (their weighted sum); per prompt the best against the worst
  (algorithm.pairs=best_worst) or every pair whose gap exceeds algorithm.min_reward_gap (all).
- Pairs from a file (data.pairs_file): a jsonl of {"prompt", "winner", "loser"}, image paths relative to the file;
  the images are encoded with the pipeline's VAE (the mode of its latent distribution).
- The loss: the policy's and the reference's (the LoRA-disabled transformer) flow-matching errors on the winner
  and the loser at one noise level t per pair. diffusion_dpo: x_t = (1 - t) x0 + t eps with one random eps
  shared by the pair (flow_pair_inputs). smpo: x_t of each image estimated by ReNoise inversion with the
  reference (samplers.renoise_inversion), the label from the rewards' gap (smpo_label). Which model SmPO inverts
  with, and how many steps, we could not read here (its method section was not reachable): the frozen reference
  is our choice, so that the inversion does not move as the policy trains.
The model is trained on the conditional velocity (no classifier-free guidance in the loss), as Diffusion-DPO's
code trains its UNet; sampling and evaluation use sampling.guidance_scale.

Several processes, as flowalign/train.py: every rank draws the same global prompt (or pair) list and takes its
block; each pair's (t, eps) comes from its own stream seeded from (seed, iteration, update, global pair index);
the loss is the mean over the global pairs, micro-batched with every rank making the same number of forward calls
(zero-weight fillers), so 1 and N processes compute the same gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from flowalign import plan, samplers
from flowalign.command import RecipeCommand, script_main
from flowalign.config import FlowPreferenceConfig
from flowalign.data import draw_prompts, read_image, read_pairs_file, read_prompts
from flowalign.evaluation import evaluate_at, load_rewards, score
from flowalign.lora import reference_model
from flowalign.model import (
    check_image_size,
    check_rewards_first,
    load_policy,
    prompt_encoder,
    restore_policy,
    iteration_generator,
    load_adapter,
    plain_transformer,
    sample_noise,
    save_training_checkpoint,
    velocity_fn_for,
)
from flowalign.report import finish_run, format_eval
from shared.config import ConfigError
from shared.preference import (
    FLOW_PREFERENCE_LOSSES,
    flow_matching_errors,
    flow_matching_inputs,
    flow_pair_inputs,
    smpo_label,
)
from shared.loop import Plan, open_run, run_loop
from shared.run import Run


@dataclasses.dataclass
class Pairs:
    """This rank's preference pairs of one iteration."""

    winner: torch.Tensor  # [B, C, h, w] clean latents of the preferred image
    loser: torch.Tensor  # [B, C, h, w]
    prompt_index: torch.Tensor  # [B] index into the rank's prompt list of the iteration
    reward_winner: torch.Tensor  # [B] weighted reward sum (NaN where not scored: diffusion_dpo on a file)
    reward_loser: torch.Tensor  # [B]
    pair_id: torch.Tensor  # [B] global pair index: its (t, eps) stream

    def __len__(self) -> int:
        return len(self.pair_id)


def encode_images(adapter, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w]: the VAE's latent mode, shifted and scaled as the
    pipeline's latents (the inverse of adapter.decode up to the VAE's reconstruction error)."""
    vae = adapter.pipeline.vae
    with torch.no_grad():
        z = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()  # [B, C, h, w]
    return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).to(adapter.dtype)


# ------------------------------------------------------------------------------ on-policy pairs
def select_pairs(rewards: torch.Tensor, mode: str, min_gap: float) -> list[tuple[int, int, int]]:
    """(group, winner, loser) indices from rewards [P, G]: best against worst, or every (i, j) with
    r_i - r_j > min_gap. NaN rewards (dropped samples) never enter a pair; ties give no pair."""
    chosen = []
    for group, row in enumerate(rewards.tolist()):
        finite = [(r, i) for i, r in enumerate(row) if math.isfinite(r)]
        if mode == "best_worst":
            if len(finite) >= 2:
                (best, i), (worst, j) = max(finite), min(finite)
                if best - worst > min_gap:
                    chosen.append((group, i, j))
        else:
            chosen += [(group, i, j) for ri, i in finite for rj, j in finite if ri - rj > min_gap]
    return chosen


@torch.no_grad()
def on_policy_pairs(config, run, adapter, encode, rewards, prompts, first_slot, iteration) -> tuple[Pairs, dict]:
    """Sample G ODE images per prompt (this rank's `prompts`, global slots from first_slot), score them and pair
    them (`select_pairs`); the initial noise of each sample from (seed, iteration, global sample index)."""
    s, t, a = config.sampling, config.train, config.algorithm
    groups = t.group_size
    first = first_slot * groups
    count = len(prompts) * groups
    noise = adapter.initial_noise(
        count,
        sample_noise(adapter.device, t.seed, iteration, samples=range(first, first + count)).generators,
        s.height,
        s.width,
    )  # [n, C, h, w]
    embeds = encode(prompts).repeat_interleave(groups)
    with plain_transformer(run, adapter):
        final = samplers.sample_trajectory(
            velocity_fn_for(adapter, embeds, s.guidance_scale),
            noise,
            adapter.sigmas(s.num_steps, s.height, s.width),
            [],
        ).final  # [n, C, h, w]
    images = adapter.decode(final)  # [n, 3, H, W]
    texts = [prompts[i // groups] for i in range(count)]
    metadata = [{"split": "train", "iteration": iteration + 1, "sample": first + i} for i in range(count)]
    scores = score(
        rewards, images, texts, metadata, config.reward.on_bad_score == "drop", [i // groups for i in range(count)]
    )
    total = sum(config.reward.weights[name] * value.double() for name, value in scores.items())  # [n]
    chosen = select_pairs(total.view(len(prompts), groups), a.pairs, a.min_reward_gap)
    group = torch.tensor([g for g, _, _ in chosen], dtype=torch.long)  # [B]
    win = group * groups + torch.tensor([i for _, i, _ in chosen], dtype=torch.long)  # [B] sample index
    lose = group * groups + torch.tensor([j for _, _, j in chosen], dtype=torch.long)  # [B]
    offset = int(run.gather(torch.tensor([len(chosen)]))[: run.rank].sum())  # pairs of the ranks before this one
    pairs = Pairs(
        final[win], final[lose], group, total[win].float(), total[lose].float(), offset + torch.arange(len(chosen))
    )
    everyone = run.gather(total)  # [N] the global batch: its statistics do not depend on the world size
    finite = everyone[everyone.isfinite()]
    stats = {
        "reward/mean": float(finite.mean()) if len(finite) else math.nan,
        "reward/dropped": len(everyone) - len(finite),
    }
    return pairs, stats


def file_pairs(config, run, adapter, rewards, records, chosen: list[int], first: int) -> Pairs:
    """This rank's block of the iteration's pairs from data.pairs_file (records[chosen]), encoded; scored by the
    rewards for smpo's label (diffusion_dpo needs no scores: NaN)."""
    mine = [records[i] for i in chosen]
    winner = torch.stack([read_image(r.winner) for r in mine])  # [B, 3, H, W]
    loser = torch.stack([read_image(r.loser) for r in mine])  # [B, 3, H, W]
    reward_winner = reward_loser = torch.full((len(mine),), math.nan)  # [B]
    if config.algorithm.name == "smpo":
        texts = [r.prompt for r in mine]
        pair_groups = list(range(len(mine))) * 2  # a groupwise reward compares each pair's winner and loser
        both = score(
            rewards,
            torch.cat([winner, loser]),
            texts + texts,
            [{"split": "pairs"}] * (2 * len(mine)),
            groups=pair_groups,
        )
        total = sum(config.reward.weights[name] * value.double() for name, value in both.items()).float()  # [2B]
        reward_winner, reward_loser = total[: len(mine)], total[len(mine) :]
    return Pairs(
        encode_images(adapter, winner),
        encode_images(adapter, loser),
        torch.arange(len(mine)),
        reward_winner,
        reward_loser,
        first + torch.arange(len(mine)),
    )


# ------------------------------------------------------------------------------ update
_DPO_METRICS = ["loss", "implicit_accuracy", "reward_margin", "chosen_rewards", "rejected_rewards"]
METRICS = {  # logged as train/<name>, each the mean over the iteration's pairs
    "diffusion_dpo": [*_DPO_METRICS, "policy_error", "reference_error"],
    "smpo": [*_DPO_METRICS, "policy_error", "reference_error", "label"],
}


def pair_draws(seed: int, iteration: int, update: int, pair_id: torch.Tensor, shape, t_min: float, t_max: float):
    """(t [B], eps [B, ...]) of each pair from its own stream (seed, iteration, update, global pair index), on the
    CPU: the same whatever the world size or device."""
    ts, noises = [], []
    for i in pair_id.tolist():
        generator = torch.Generator().manual_seed(samplers.stream_seed("pair", seed, iteration, update, i))
        ts.append(t_min + (t_max - t_min) * torch.rand((), generator=generator, dtype=torch.float64))
        noises.append(torch.randn(shape, generator=generator))
    if not ts:
        return torch.zeros(0), torch.zeros((0, *shape))
    return torch.stack(ts).float(), torch.stack(noises)  # [B], [B, C, h, w]


def loss_inputs(config, velocity_reference, winner, loser, t, noise) -> tuple[torch.Tensor, ...]:
    """(x_t [2B, ...], target [2B, ...], implied noise of the winners and the losers [B, ...] each). diffusion_dpo:
    the pair's shared eps. smpo: x_t of each image by ReNoise inversion under `velocity_reference(x, sigma)` and
    the noise that x_t implies, eps = (x_t - (1 - t) x0) / t, so that x_t = (1 - t) x0 + t eps again."""
    a = config.algorithm
    if a.name == "diffusion_dpo":
        x_t, target = flow_pair_inputs(winner, loser, noise, t)
        return x_t, target, noise, noise
    clean = torch.cat([winner, loser])  # [2B, ...]
    times = torch.cat([t, t])  # [2B]
    with torch.no_grad():
        inverted = samplers.renoise_inversion(velocity_reference, clean, times, a.inversion_steps, a.renoise_iterations)
    scale = times.reshape(-1, *[1] * (clean.dim() - 1)).to(clean.dtype)  # [2B, 1, 1, 1]
    implied = (inverted - (1 - scale) * clean) / scale  # [2B, ...]
    x_t, target = flow_matching_inputs(clean, implied, times)
    noise_w, noise_l = implied.chunk(2)
    return x_t, target, noise_w, noise_l


def update(config, run, adapter, optimizer, params, embeds, pairs: Pairs, total_pairs: int, iteration: int, step: int):
    """One optimizer step on the mean loss over the iteration's global pairs, micro-batched: each rank's
    micro-batch adds (sum of its pair losses) / total_pairs (Run.backward scales for DDP), and every rank makes
    the same number of forward calls (a rank short of pairs runs zero-weight fillers). Returns (metrics summed
    over this rank's pairs / total_pairs, the recorded batch: t, noises, label and per-pair loss)."""
    a, t = config.algorithm, config.train
    model = adapter.transformer
    loss_fn = FLOW_PREFERENCE_LOSSES[a.name]
    shape = tuple(adapter.latent_shape(config.sampling.height, config.sampling.width))  # (C, h, w)
    times, noise = pair_draws(t.seed, iteration, step, pairs.pair_id, shape, a.t_min, a.t_max)
    micros = list(torch.arange(len(pairs)).split(config.memory.micro_batch_size))
    micro_count = run.most(len(micros))
    totals = dict.fromkeys(METRICS[a.name], 0.0)  # the same keys on every rank: they are summed over ranks
    record = {"t": [], "noise_winner": [], "noise_loser": [], "label": [], "loss": []}
    nonfinite = False
    optimizer.zero_grad(set_to_none=True)
    for index in range(micro_count):
        real = index < len(micros)
        rows = micros[index] if real else torch.zeros(0, dtype=torch.long)
        if real:
            winner, loser = pairs.winner[rows], pairs.loser[rows]  # [m, C, h, w] each
            t_rows, eps = times[rows].to(adapter.device), noise[rows].to(adapter.device, winner.dtype)  # [m], [m, ...]
            pair_embeds = embeds[pairs.prompt_index[rows]]
            reward_w, reward_l = pairs.reward_winner[rows], pairs.reward_loser[rows]  # [m]
        else:  # a zero-weight filler: any valid input
            winner = loser = torch.zeros((1, *shape), device=adapter.device, dtype=adapter.dtype)
            t_rows, eps = torch.full((1,), 0.5, device=adapter.device), torch.zeros_like(winner)
            pair_embeds = embeds[torch.zeros(1, dtype=torch.long)]
            reward_w = reward_l = torch.zeros(1)
        doubled = type(pair_embeds).cat([pair_embeds, pair_embeds])  # winners then losers share their prompt
        with run.sync_gradients(model, last=index == micro_count - 1):
            with plain_transformer(run, adapter) as plain, reference_model(plain, config.model.lora):

                def reference(x, sigma, embeds=doubled):
                    return adapter.velocity(x, sigma, embeds, 1.0)

                x_t, target, noise_w, noise_l = loss_inputs(config, reference, winner, loser, t_rows, eps)
                with torch.no_grad():
                    ref_errors = flow_matching_errors(reference(x_t, torch.cat([t_rows, t_rows])), target)  # [2m]
            velocity = adapter.velocity(x_t, torch.cat([t_rows, t_rows]), doubled, 1.0)  # [2m, C, h, w]
            errors = flow_matching_errors(velocity, target)  # [2m]
            err_w, err_l = errors.chunk(2)
            ref_w, ref_l = ref_errors.chunk(2)
            if a.name == "smpo":
                label = smpo_label(reward_w.to(errors), reward_l.to(errors), a.label_temperature)  # [m]
                losses, metrics = loss_fn(err_w, err_l, ref_w, ref_l, label, a.beta, a.gamma)
            else:
                label = torch.ones_like(err_w)  # the binary label
                losses, metrics = loss_fn(err_w, err_l, ref_w, ref_l, a.beta)
            weight = 1.0 / total_pairs if real else 0.0
            run.backward(losses.sum() * weight)
        if real:
            nonfinite |= not bool(losses.detach().isfinite().all())
            for key, value in {"loss": losses.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value.sum()) / total_pairs
            for key, value in (
                ("t", t_rows),
                ("noise_winner", noise_w),
                ("noise_loser", noise_l),
                ("label", label),
                ("loss", losses),
            ):
                record[key].append(value.detach().float().cpu())
    if run.any(nonfinite):  # every rank stops together, before the step spoils the weights
        raise FloatingPointError("loss became non-finite; lower train.learning_rate or algorithm.beta")
    grad_norm = run.clip_grad_norm(model, params, t.max_grad_norm)
    optimizer.step()
    summed = run.sum(torch.tensor(list(totals.values()), dtype=torch.float64))  # [K] over ranks
    metrics = {**dict(zip(totals, summed.tolist())), "grad_norm": grad_norm}
    return metrics, {k: torch.cat(v) if v else torch.zeros(0) for k, v in record.items()}


def save_pairs_record(run: Run, path: Path, pairs: Pairs, record: dict, prompts: list[str]) -> None:
    """The first update's batch of this rank (train.save_pairs): safetensors, the prompts in its metadata."""
    from safetensors.torch import save_file  # only when train.save_pairs asks for the record

    tensors = {
        "winner": pairs.winner.float().cpu(),
        "loser": pairs.loser.float().cpu(),
        "reward_winner": pairs.reward_winner.float().cpu(),
        "reward_loser": pairs.reward_loser.float().cpu(),
        "pair_id": pairs.pair_id,
        **record,
    }
    path = path.with_name(f"{path.stem}-rank{run.rank}{path.suffix}") if run.world > 1 else path
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [prompts[i] for i in pairs.prompt_index.tolist()]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"prompts": json.dumps(texts)})


# -------------------------------------------------------------------------------------- main
@dataclasses.dataclass
class PairBatch:
    """One iteration's pairs as they pass from the rollout stage to the update."""

    index: int  # 0-based iteration
    local_prompts: list[str]  # this rank's prompts (of its pairs)
    pairs: Pairs
    total_pairs: int  # over all ranks
    stats: dict  # reward/... and pairs metrics
    timings: dict[str, float]


class FlowPreferenceRecipe:
    """Diffusion-DPO / SmPO-Diffusion as the stages of shared.loop.run_loop: rollout (on-policy pairs, or pairs
    from data.pairs_file) -> update."""

    def __init__(self, config: FlowPreferenceConfig, train_prompts, eval_prompts, records, size):
        self.config, self.train_prompts, self.eval_prompts = config, train_prompts, eval_prompts
        self.records, self.size = records, size  # data.pairs_file's (None: on-policy pairs)

    def setup(self, run: Run) -> Plan:
        """Model, trainable parameters, optimizer, rewards, prompt embeddings; the checkpoint restored."""
        config, t, a, records = self.config, self.config.train, self.config.algorithm, self.records
        self.run = run
        run.require_divisible(t.prompts_per_iteration, "train.prompts_per_iteration", "prompts")  # before the model
        self.adapter, self.params, self.optimizer, latent_shape = load_policy(config, run, load_adapter)
        if records is not None:
            expected = tuple(n * self.adapter.pipeline.vae_scale_factor for n in latent_shape[1:])
            if self.size != expected:
                raise ConfigError(
                    f"config field 'data.pairs_file': its images are {self.size[0]} x {self.size[1]} pixels, the "
                    f"model makes {expected[0]} x {expected[1]}; resize them or set sampling.height and "
                    f"sampling.width"
                )
        self.rewards, eval_rewards = load_rewards(config)
        self.all_rewards = {**self.rewards, **eval_rewards}
        pair_prompts = sorted({r.prompt for r in records}) if records is not None else []
        self.encode = prompt_encoder(config, self.adapter, self.train_prompts + self.eval_prompts + pair_prompts)
        source = f"pairs from {config.data.pairs_file}" if records is not None else f"on-policy pairs ({a.pairs})"
        run.print(
            f"{a.name}: {source}, {t.prompts_per_iteration} prompts"
            + (f" x {t.group_size} samples" if records is None else " (pairs)")
            + f" per iteration over {run.world} process(es); {sum(p.numel() for p in self.params):,} trainable "
            f"parameters; output {run.out}"
        )
        start = run.restore()
        if run.checkpoint is not None:
            restore_policy(run, self.adapter, self.optimizer)
        run.write_config(config)
        check_rewards_first(config, self.adapter, self.all_rewards, self.train_prompts)
        curves = [*(["reward/mean"] if records is None else []), *[f"eval/{n}" for n in self.all_rewards], "train/loss"]
        title = f"{a.name} on {config.model.path}"
        return Plan(start, t.iterations, a.name, config.budget.max_seconds, curves=tuple(curves), title=title)

    def rollout(self, iteration: int) -> PairBatch:
        """The iteration's pairs: every rank draws the same global prompt (or pair) list and takes its block."""
        config, run, t, records = self.config, self.run, self.config.train, self.records
        generator = iteration_generator(t.seed, iteration)  # shared by all ranks
        clock = time.perf_counter()
        block = run.block(t.prompts_per_iteration)
        if records is None:
            prompts = draw_prompts(self.train_prompts, t.prompts_per_iteration, generator)
            local_prompts = prompts[block.start : block.stop]
            pairs, stats = on_policy_pairs(
                config, run, self.adapter, self.encode, self.rewards, local_prompts, block.start, iteration
            )
        else:
            chosen = draw_prompts(list(range(len(records))), t.prompts_per_iteration, generator)
            mine = chosen[block.start : block.stop]
            local_prompts = [records[i].prompt for i in mine]
            pairs = file_pairs(config, run, self.adapter, self.rewards, records, mine, block.start)
            stats = {}
        total_pairs = int(run.sum(float(len(pairs))))
        gap = (pairs.reward_winner - pairs.reward_loser).double()  # [B]
        stats["pairs"] = total_pairs
        stats["reward/pair_gap"] = float(run.sum(float(gap.nansum())) / max(total_pairs, 1))
        timings = {"time/pairs": time.perf_counter() - clock}
        return PairBatch(iteration, local_prompts, pairs, total_pairs, stats, timings)

    def update(self, batch: PairBatch) -> dict:
        """algorithm.num_iterations optimizer steps on the pairs (none when no pair was found: on-policy groups
        whose samples all tie, on every rank); the first step's batch saved when train.save_pairs asks."""
        config, run = self.config, self.run
        clock = time.perf_counter()
        metrics = {}
        if batch.total_pairs:
            embeds = self.encode(batch.local_prompts)
            self.adapter.transformer.train()
            for step in range(config.algorithm.num_iterations):
                step_metrics, recorded = update(
                    config,
                    run,
                    self.adapter,
                    self.optimizer,
                    self.params,
                    embeds,
                    batch.pairs,
                    batch.total_pairs,
                    batch.index,
                    step,
                )
                if step == 0:
                    metrics = step_metrics
                    if config.train.save_pairs:
                        path = run.out / "pairs" / f"iter-{batch.index + 1:06d}.safetensors"
                        save_pairs_record(run, path, batch.pairs, recorded, batch.local_prompts)
            self.adapter.transformer.eval()
        batch.timings["time/update"] = time.perf_counter() - clock
        return metrics

    def record(self, batch: PairBatch, metrics: dict) -> dict:
        return {
            **batch.stats,
            **{f"train/{k}": v for k, v in metrics.items()},
            "world_size": self.run.world,
            **batch.timings,
        }

    def evaluate(self, done: int) -> dict:
        run = self.run
        return evaluate_at(self.config, run, self.adapter, self.encode, self.all_rewards, self.eval_prompts, done)

    def report_before(self, before: dict) -> None:
        self.run.print(f"held-out reward before: {format_eval(before)}")

    def postfix(self, record: dict) -> dict:
        return {"pairs": record["pairs"], "loss": f"{record.get('train/loss', math.nan):.4f}"}

    def save(self, done: int) -> None:
        save_training_checkpoint(self.config, self.run, self.adapter, self.optimizer, None, done)

    def finish(self, before: dict, after: dict) -> dict:
        return finish_run(self.run, self.config, self.eval_prompts, before or None, after)


def train(config: FlowPreferenceConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    """Train `config` (see the module docstring); returns the held-out eval/ means before (None on a resumed
    run) and after."""
    check_image_size(config)  # from the model's config.json, before the prompts and the output directory
    train_prompts, eval_prompts = read_prompts(config)
    records, size = read_pairs_file(config.data.pairs_file) if config.data.pairs_file else (None, None)
    run = open_run(config, resume, allow_config_change, tag="[flowalign]")
    recipe = FlowPreferenceRecipe(config, train_prompts, eval_prompts, records, size)
    return run_loop(recipe, run, config.log.eval_every, config.log.checkpoint_every)


COMMAND = RecipeCommand(
    FlowPreferenceConfig,
    train,
    plan.preference_dry_run,
    __doc__ or "",
    "configs/flow/diffusion_dpo.yaml",
    "model source, prompts, pairs file and rewards",
)

if __name__ == "__main__":  # the older command: python flowalign/preference.py --config ... (accelerate launch too)
    script_main(COMMAND)
