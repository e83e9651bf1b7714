"""RL forecasts from the model's own rollouts: seeded sampling within the budgets, TRL's reward-function calls and
advantages, the reward-filtered demonstrations, the reward-weighted shift against a dense computation, the
no-signal and bad-input errors, and 1 vs 2 processes (torchrun, gloo; this file is also the worker)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSInputError
from sts_callback.core.data import load_domains
from sts_callback.core.errors import STSDataWarning
from sts_callback.pipelines.forecast import ForecastSetup
from sts_callback.pipelines.rollouts import (RolloutGroup, Rollouts, RolloutSettings, group_advantages,
                                             rollout_forecast, run_rollout_forecast, sample_rollouts)

LAYER = 1
SETTINGS = {"num_generations": 4, "max_completion_length": 6, "temperature": 1.0}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("llama", vocab_size=len(tokenizer)).double()


@pytest.fixture(scope="module")
def sae():
    return TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()


def config(**overrides):
    values = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, batch_size=4, n_domain_demonstrations=2,
                  rollout_prompts=4, rollout_generations=4, rollout_max_tokens=8)
    values.update(overrides)
    return STSConfig(**values)


def prompts(n=8):
    return [{"prompt": text, "answer": str(i)} for i, text in enumerate(domain_texts("law", n, length=6))]


def first_token(completion_ids, **kwargs):
    """A reward that separates almost every group: the id of the first sampled token."""
    return [float(ids[0]) for ids in completion_ids]


def targets():
    return {d: domain_texts(d, n=8) for d in ("code", "chem")}


def test_sampling_is_seeded_and_leaves_the_model_and_rng_as_they_were(model, tokenizer):
    model.train()
    rng = torch.get_rng_state()
    try:
        a = sample_rollouts(model, tokenizer, prompts(), first_token, config(), SETTINGS)
        b = sample_rollouts(model, tokenizer, prompts(), first_token, config(), SETTINGS)
        c = sample_rollouts(model, tokenizer, prompts(), first_token, config(seed=1), SETTINGS)
        assert model.training
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        model.eval()
    assert [g.completion_ids for g in a.groups] == [g.completion_ids for g in b.groups]
    assert [g.index for g in a.groups] == [g.index for g in b.groups]
    assert [g.completion_ids for g in a.groups] != [g.completion_ids for g in c.groups]
    # a prompt's completions depend on its own seed only, not on which other prompts were sampled
    wider = sample_rollouts(model, tokenizer, prompts(), first_token, config(rollout_prompts=8), SETTINGS)
    by_index = {g.index: g.completion_ids for g in wider.groups}
    assert all(by_index[g.index] == g.completion_ids for g in a.groups)


def test_budgets_cap_prompts_generations_and_tokens(model, tokenizer):
    r = sample_rollouts(model, tokenizer, prompts(10), first_token, config(rollout_prompts=3, rollout_generations=3),
                        {**SETTINGS, "num_generations": 8, "max_completion_length": 5})
    assert len(r.groups) == 3 and len({g.index for g in r.groups}) == 3
    assert r.num_generations == 3 and r.rewards.shape == (3, 3)
    assert all(1 <= len(ids) <= 5 for g in r.groups for ids in g.completion_ids)
    assert r.summary()["max_completion_length"] == 5
    r = sample_rollouts(model, tokenizer, prompts(10), first_token, config(rollout_generations=5, rollout_max_tokens=4),
                        {**SETTINGS, "num_generations": 2, "max_completion_length": None})
    assert r.num_generations == 2 and all(len(ids) <= 4 for g in r.groups for ids in g.completion_ids)
    assert len(r.groups) == 4
    # GRPOConfig.generation_kwargs' max_new_tokens wins over max_completion_length (as in TRL), the budget over both
    eos = {tokenizer.eos_token_id}
    for kwargs, budget, longest in (({"min_new_tokens": 40, "max_new_tokens": 40}, 4, 4),
                                    ({"max_new_tokens": 3}, 8, 3)):
        r = sample_rollouts(model, tokenizer, prompts(10), first_token, config(rollout_max_tokens=budget),
                            {**SETTINGS, "max_completion_length": 6, "generation_kwargs": kwargs})
        assert r.summary()["max_completion_length"] == longest
        lengths = [len(ids) for g in r.groups for ids in g.completion_ids]
        assert max(lengths) == longest
        if "min_new_tokens" in kwargs:  # the user's minimum, capped too: every completion runs to the budget
            assert all(n == longest or ids[-1] in eos for g in r.groups for ids in g.completion_ids
                       for n in [len(ids)])


@pytest.mark.filterwarnings("ignore:.*got the same reward")  # lengths and one word: most groups tie
def test_reward_functions_get_trls_keyword_arguments_and_weights(model, tokenizer):
    seen = []

    def recorder(prompts, completions, completion_ids, **kwargs):
        seen.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
        return [float(len(ids)) for ids in completion_ids]

    async def async_reward(completions, **kwargs):
        return [1.0 if "law" in c else 0.0 for c in completions]

    state = object()
    r = sample_rollouts(model, tokenizer, prompts(), [recorder, async_reward], config(),
                        {**SETTINGS, "reward_weights": [1.0, 0.5]}, trainer_state=state)
    assert len(seen) == len(r.groups)
    for call, group in zip(seen, r.groups):
        assert set(call) == {"prompts", "completions", "completion_ids", "answer", "trainer_state", "log_extra",
                             "log_metric"}
        assert call["prompts"] == [group.prompt] * 4 and call["answer"] == [group.columns["answer"]] * 4
        assert call["completion_ids"] == group.completion_ids
        assert call["completions"] == tokenizer.batch_decode(group.completion_ids, skip_special_tokens=True)
        assert call["trainer_state"] is state and call["log_metric"]("x", 1.0) is None
    expected = torch.tensor([[len(ids) + 0.5 * ("law" in c) for ids, c in zip(g.completion_ids, g.completions)]
                             for g in r.groups], dtype=torch.float64)
    torch.testing.assert_close(r.rewards, expected)
    assert r.summary()["reward_funcs"] == ["recorder", "async_reward"]

    chat = [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in prompts()]
    seen.clear()
    r = sample_rollouts(model, tokenizer, chat, recorder, config(rollout_prompts=2), SETTINGS)
    assert all(c == [{"role": "assistant", "content": text}] for call in seen for c, text in zip(
        call["completions"], tokenizer.batch_decode(call["completion_ids"], skip_special_tokens=True)))
    # the chat prompt went through the template with the generation prompt
    assert r.groups[0].prompt_ids == tokenizer(tokenizer.apply_chat_template(
        r.groups[0].prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_async_rewards_meet_one_long_lived_event_loop_the_trainers_where_given(model, tokenizer):
    """An async reward keeping a loop-bound resource (an HTTP client, a semaphore) between calls broke on STS's
    second call: each ran under a fresh asyncio.run. GRPOTrainer awaits them all on its one async_loop."""
    import asyncio
    import threading

    loops = []

    async def judge(completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        return [float(len(c)) for c in completions]

    sample_rollouts(model, tokenizer, prompts(), judge, config(rollout_prompts=2), SETTINGS)
    sample_rollouts(model, tokenizer, prompts(), judge, config(rollout_prompts=2, seed=1), SETTINGS)
    assert len(loops) == 4 and len(set(map(id, loops))) == 1 and loops[0].is_running()
    trainers = asyncio.new_event_loop()
    threading.Thread(target=trainers.run_forever, daemon=True).start()
    try:
        sample_rollouts(model, tokenizer, prompts(), judge, config(rollout_prompts=2), SETTINGS, async_loop=trainers)
        assert loops[-1] is trainers and loops[-2] is trainers
    finally:
        trainers.call_soon_threadsafe(trainers.stop)


def test_a_reward_reading_whole_groups_is_told_to_raise_rollout_generations(model, tokenizer):
    def rank_in_group(completions, **kwargs):  # GRPOTrainer always passes whole groups of num_generations
        return torch.tensor([float(len(c)) for c in completions]).view(-1, 4).argsort(dim=1).flatten().tolist()

    with pytest.raises(STSInputError, match=r"groups of 2 completions .* scores 4 .*rollout_generations=4\)"):
        sample_rollouts(model, tokenizer, prompts(), rank_in_group, config(rollout_generations=2), SETTINGS)
    assert sample_rollouts(model, tokenizer, prompts(), rank_in_group, config(), SETTINGS).num_generations == 4


def test_a_large_prompt_set_is_read_only_where_drawn(model, tokenizer, monkeypatch):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": [f"the court {i}" for i in range(5000)]})
    read = []
    real = Dataset.__getitem__

    def counted(self, key):
        if isinstance(key, int):
            read.append(key)
        return real(self, key)

    monkeypatch.setattr(Dataset, "__getitem__", counted)
    r = sample_rollouts(model, tokenizer, data, first_token, config(rollout_prompts=3), SETTINGS)
    assert len(r.groups) == 3 and len(read) == 3  # the three drawn rows, not 5,000


def test_grpo_advantages_and_the_high_reward_demonstrations(model, tokenizer):
    rewards = torch.tensor([[[1.0], [2.0], [3.0], [6.0]], [[0.0], [math.nan], [1.0], [2.0]]], dtype=torch.float64)
    total, advantages = group_advantages(rewards, torch.tensor([1.0]))

    def grpo(values):  # group mean and unbiased group std, as GRPO's "group" scaling
        values = torch.tensor(values, dtype=torch.float64)
        return (values - values.mean()) / (values.std() + 1e-4)

    torch.testing.assert_close(advantages[0], grpo([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(advantages[1, [0, 2, 3]], grpo([0.0, 1.0, 2.0]))  # the None is left out
    assert torch.isnan(total[1, 1]) and advantages[1, 1] == 0  # unscorable: no advantage

    r = sample_rollouts(model, tokenizer, prompts(), first_token, config(), SETTINGS)
    demos = r.demonstrations()
    expected = [{"prompt": g.prompt, "completion": c} for g in r.groups for c, ids in zip(g.completions,
                g.completion_ids) if ids[0] > sum(i[0] for i in g.completion_ids) / len(g.completion_ids)]
    assert demos == expected and 0 < len(demos) < 16
    best = r.demonstrations(top_fraction=0.25)
    assert best == [{"prompt": g.prompt, "completion": g.completions[max(range(4), key=lambda j: (
        g.completion_ids[j][0], -j))]} for g in r.groups]
    # usable as demonstrations= of the in-context forecast, by the callback's name ("demonstrations" is its earlier
    # name); rollout_forecast's default is the callback's, the reward-weighted shift; a misspelt shift is named
    # before any work
    with pytest.raises(STSConfigError, match=r"shift='filtered': use one of \('reward_filtered', 'reward_weighted'"):
        rollout_forecast(model, tokenizer, None, prompts(), first_token, targets(), shift="filtered")
    tiny_sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    result = rollout_forecast(model, tokenizer, tiny_sae, prompts(), first_token, targets(), config(),
                              settings=SETTINGS, shift="reward_filtered")
    assert result.settings["demonstrations"] == "reward_filtered_rollouts"
    assert result.settings["shift"] == "reward_filtered"  # as the callback records it (it read "in_context")
    assert result.settings["rollouts"]["prompts"] == 4
    default = rollout_forecast(model, tokenizer, tiny_sae, prompts(), first_token, targets(), config(),
                               settings=SETTINGS)
    assert "demonstrations" not in default.settings and default.settings["rollouts"]["prompts"] == 4


def test_none_and_all_equal_rewards(model, tokenizer, sae):
    def first_is_none(completion_ids, **kwargs):  # called once per prompt's group: its first completion unscored
        return [None] + first_token(completion_ids[1:])

    r = sample_rollouts(model, tokenizer, prompts(), first_is_none, config(), SETTINGS)
    assert torch.isnan(r.rewards[:, 0]).all() and (r.advantages[:, 0] == 0).all()
    assert not torch.isnan(r.rewards[:, 1:]).any() and r.summary()["unscorable"] == 4
    reference = sample_rollouts(model, tokenizer, prompts(), first_token, config(), SETTINGS)
    for g, group in enumerate(reference.groups):  # the group's mean and std leave the None out
        values = reference.rewards[g, 1:]
        torch.testing.assert_close(r.advantages[g, 1:], (values - values.mean()) / (values.std() + 1e-4))
    demos = r.demonstrations()
    assert demos and all(d["completion"] != g.completions[0] for g in r.groups for d in demos
                         if d["prompt"] == g.prompt)

    with pytest.warns(STSDataWarning, match="same reward"):
        r = sample_rollouts(model, tokenizer, prompts(), lambda completions, **kw: [None] * len(completions),
                            config(), SETTINGS)
    with pytest.raises(STSInputError, match=r"returned None \(or NaN\) for all 16"):
        r.demonstrations()
    with pytest.warns(STSDataWarning, match="same reward"):
        r = sample_rollouts(model, tokenizer, prompts(), lambda completions, **kw: [math.nan] * len(completions),
                            config(), SETTINGS)
    with pytest.raises(STSInputError, match=r"returned None \(or NaN\) for all 16"):
        r.demonstrations()

    with pytest.warns(STSDataWarning, match="Of 4 prompts .*, 4 got the same reward"):
        r = sample_rollouts(model, tokenizer, prompts(), lambda completions, **kw: [1.0] * len(completions),
                            config(), SETTINGS)
    with pytest.raises(STSInputError, match=r"no signal.*values seen: \[1.0\]"):
        r.demonstrations()
    with pytest.raises(STSInputError, match="no signal"), pytest.warns(STSDataWarning):
        rollout_forecast(model, tokenizer, sae, prompts(), lambda completions, **kw: [0.0] * len(completions),
                         targets(), config(), settings=SETTINGS)


def test_bad_inputs_name_the_problem(model, tokenizer):
    def run(prompts_=None, reward=first_token, settings=SETTINGS, **kwargs):
        return sample_rollouts(model, tokenizer, prompts() if prompts_ is None else prompts_, reward, config(),
                               settings, **kwargs)

    with pytest.raises(STSInputError, match="No prompts given"):
        run([])
    with pytest.raises(STSInputError, match="Prompt 0 of prompts"):
        run([{"question": "x"}])
    with pytest.raises(STSInputError, match="Linear model.*Wrap the reward model"):
        run(reward=torch.nn.Linear(2, 1))
    with pytest.raises(STSInputError, match="model id 'org/reward-model'"):
        run(reward=[first_token, "org/reward-model"])
    with pytest.raises(STSInputError, match="No reward function"):
        run(reward=[])
    with pytest.raises(STSInputError, match="returned 1 rewards for 4 completions"):
        run(reward=lambda completions, **kw: [1.0])
    with pytest.raises(STSInputError, match="rewards must be numbers"):
        run(reward=lambda completions, **kw: ["high"] * len(completions))
    def correct(prompts, completions, answer, score_key, **kwargs):  # needs a column the prompts lack
        return [1.0] * len(completions)

    with pytest.raises(STSInputError, match=r"Reward function 1 \('correct'\) raised TypeError.*score_key.*"
                                            r"other columns: \['answer'\]"):
        run(reward=[first_token, correct])
    with pytest.raises(STSConfigError, match="2 reward weights for 1 reward functions"):
        run(settings={**SETTINGS, "reward_weights": [1.0, 2.0]})
    with pytest.raises(STSConfigError, match="at least 2"):
        run(settings={**SETTINGS, "num_generations": 1})
    with pytest.raises(STSConfigError, match="Unknown rollout setting"):
        run(settings={"num_generation": 4})
    with pytest.raises(STSConfigError, match="rollout_generations must be an integer >= 2"):
        config(rollout_generations=1)


def test_a_probe_draw_can_sample_without_calling_the_reward_functions(model, tokenizer):
    def refuses(**kwargs):
        raise AssertionError("a reward function was called")

    r = sample_rollouts(model, tokenizer, prompts(), refuses, config(), SETTINGS, prompt_indices=[0, 1], score=False)
    scored = sample_rollouts(model, tokenizer, prompts(), first_token, config(), SETTINGS, prompt_indices=[0, 1])
    assert [g.completion_ids for g in r.groups] == [g.completion_ids for g in scored.groups]
    assert torch.isnan(r.rewards).all() and r.reward_names == ["not scored"]


def test_settings_from_a_grpo_config():
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(output_dir="/tmp/sts-grpo-args", num_generations=4, temperature=0.7, top_k=5,
                          max_completion_length=16, reward_weights=[1.0, 0.5], scale_rewards=False, use_cpu=True,
                          report_to=[])
    settings = RolloutSettings.from_args(args)
    assert (settings.num_generations, settings.temperature, settings.top_k, settings.max_completion_length,
            settings.reward_weights, settings.scale_rewards) == (4, 0.7, 5, 16, [1.0, 0.5], "none")


def test_settings_from_an_rloo_config_scale_its_advantages_as_it_does(tmp_path):
    trl = pytest.importorskip("trl")
    plain = trl.RLOOConfig(output_dir=str(tmp_path), num_generations=4, use_cpu=True, report_to=[])
    assert RolloutSettings.from_args(plain).scale_rewards == "none"  # RLOO's default: no std scaling (was "group")
    normalised = trl.RLOOConfig(output_dir=str(tmp_path), num_generations=4, normalize_advantages=True,
                                use_cpu=True, report_to=[])
    assert RolloutSettings.from_args(normalised).scale_rewards == "batch"


def test_settings_of_an_online_dpo_trainer_are_its_pair_and_its_max_new_tokens(tmp_path):
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.online_dpo import OnlineDPOConfig

    from sts_callback.integrations.trainer_shift import _rollout_settings

    args = OnlineDPOConfig(output_dir=str(tmp_path), max_new_tokens=3, temperature=1.5, use_cpu=True, report_to=[])
    settings = _rollout_settings(SimpleNamespace(args=args))
    assert (settings.num_generations, settings.max_completion_length, settings.temperature) == (2, 3, 1.5)


def test_reward_weighted_shift_equals_dense_computation(model, tokenizer, sae):
    texts = [[" law court judge", " cook bake", " law statute", " egg pan salt"],
             [" code function", " gene dna", " court appeal contract", " two three"]]
    rewards = [[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 3.0, 1.0]]
    groups = []
    for i, (prompt, completions, scores) in enumerate(zip(["what is law ?", "who is the judge ?"], texts, rewards)):
        groups.append(RolloutGroup(index=i, prompt=prompt, columns={}, prompt_ids=tokenizer(prompt)["input_ids"],
                                   completions=completions, completion_ids=[
                                       tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
                                   rewards=[[s] for s in scores]))
    rollouts = Rollouts(groups=groups, reward_names=["r"], reward_weights=[1.0],
                        settings={"scale_rewards": "group", "multi_objective_aggregation": "sum_then_normalize"})
    setup = ForecastSetup.create(model, tokenizer, sae, config())
    result = run_rollout_forecast(setup, rollouts, load_domains(targets())).forecast

    diffs = []
    for group, scores in zip(groups, rewards):
        values = torch.tensor(scores, dtype=torch.float64)
        advantage = (values - values.mean()) / (values.std() + 1e-4)
        means = []
        for ids in group.completion_ids:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([group.prompt_ids + ids]), output_hidden_states=True)
            means.append(sae.encode(out.hidden_states[LAYER + 1][0][len(group.prompt_ids):]).mean(0))
        means = torch.stack(means)
        high, low = advantage > 0, advantage < 0
        diffs.append(advantage[high] @ means[high] / advantage[high].sum()
                     - advantage[low].abs() @ means[low] / advantage[low].abs().sum())
    d = torch.stack(diffs)
    shift = (d ** 2).mean(0)
    top = torch.sort(shift, descending=True, stable=True).indices[:8]
    assert result.settings["shift"] == "reward_weighted" and result.shift_queries == 2
    assert result.shifted_latents == top.tolist()
    torch.testing.assert_close(torch.tensor(result.shift_values, dtype=torch.float64), shift[top], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(result.shift_direction, dtype=torch.float64), d.mean(0)[top], rtol=1e-6,
                               atol=1e-12)
    assert result.shift_tokens == sum(len(ids) for g in groups for ids in g.completion_ids)
    assert result.settings["rollouts"]["prompts"] == 2 and result.settings["rollouts"]["above_mean"] == 3


# ------------------------------------------------------------------------------------- 1 vs 2 processes (torchrun)

def run_worker(out: Path, processes: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, __file__, str(out)], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def test_two_processes_match_one(tmp_path):
    single = run_worker(tmp_path / "one", 1)[0]
    ranks = run_worker(tmp_path / "two", 2)
    for other in ranks:
        assert other["rollouts"] == single["rollouts"]  # every rank holds every rollout, as one process samples them
        for kind in ("reward_weighted", "preference"):
            mine, theirs = single[kind], other[kind]
            assert theirs["shifted_latents"] == mine["shifted_latents"], kind
            assert theirs["shift_tokens"] == mine["shift_tokens"] and theirs["shift_queries"] == mine["shift_queries"]
            assert theirs["shift_values"] == pytest.approx(mine["shift_values"], rel=1e-6)
            for name, domain in mine["domains"].items():
                for variant, value in domain["scores"].items():
                    if value is not None:
                        assert theirs["domains"][name]["scores"][variant] == pytest.approx(value, rel=1e-6, abs=1e-9)


def worker(out: Path) -> None:
    from sts_callback.pipelines.preference import preference_forecast

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", 0))
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer)).double()
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    cfg = config(rollout_prompts=5)  # 5 prompts and 7 preference pairs: uneven shares, padded on rank 1
    rollouts = sample_rollouts(model, tokenizer, prompts(), first_token, cfg, SETTINGS)
    result = {
        "rollouts": [[g.index, g.completion_ids, g.rewards] for g in rollouts.groups],
        "reward_weighted": run_rollout_forecast(ForecastSetup.create(model, tokenizer, sae, cfg), rollouts,
                                                load_domains(targets())).forecast.to_dict(),
        "preference": preference_forecast(model, tokenizer, sae, [
            {"prompt": "what is it ?", "chosen": " " + a, "rejected": " " + b}
            for a, b in zip(domain_texts("law", 7), domain_texts("food", 7))], targets(), cfg).to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed_worker.py: gloo's native threads sometimes abort the interpreter's teardown


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


def test_completions_the_trainer_masks_for_truncation_carry_no_weight(tokenizer):
    """GRPOConfig(mask_truncated_completions=True): a completion cut at max_completion_length before an EOS is left
    out of the loss; the forecast must not be built from it (the group's reward statistics still count it)."""
    def rollouts(mask: bool, truncated: list[bool]) -> Rollouts:
        group = RolloutGroup(index=0, prompt="what is law ?", columns={}, prompt_ids=tokenizer("what is law ?")[
            "input_ids"], completions=["law court", "cook bake", "gene dna", "two three"],
            completion_ids=[tokenizer(c, add_special_tokens=False)["input_ids"] for c in
                            ["law court", "cook bake", "gene dna", "two three"]],
            rewards=[[3.0], [2.0], [1.0], [0.0]], truncated=truncated)
        return Rollouts(groups=[group], reward_names=["r"], reward_weights=[1.0],
                        settings={"scale_rewards": "group", "mask_truncated_completions": mask})

    cut = [True, False, False, True]
    masked = rollouts(True, cut)
    assert masked.trained_advantages[0].tolist() == [0.0, *masked.advantages[0, 1:3].tolist(), 0.0]
    assert [r["completion"] for r in masked.demonstrations()] == ["cook bake"]  # not the cut best one
    assert [r["completion"] for r in rollouts(False, cut).demonstrations()] == ["law court", "cook bake"]
    with pytest.raises(STSInputError, match="mask_truncated_completions=True"):
        rollouts(True, [True, True, False, False]).demonstrations()  # what is left is all below the mean
    # the usual case, cut answers scoring low: the finished ones still train, above the mean
    low_cut = Rollouts(groups=[RolloutGroup(
        index=0, prompt="what is law ?", columns={}, prompt_ids=tokenizer("what is law ?")["input_ids"],
        completions=["law court", "cook bake", "gene dna", "two three"],
        completion_ids=[tokenizer(c, add_special_tokens=False)["input_ids"] for c in
                        ["law court", "cook bake", "gene dna", "two three"]],
        rewards=[[1.0], [1.0], [0.0], [0.0]], truncated=[False, False, True, True])], reward_names=["r"],
        reward_weights=[1.0], settings={"scale_rewards": "group", "mask_truncated_completions": True})
    assert [r["completion"] for r in low_cut.demonstrations()] == ["law court", "cook bake"]
