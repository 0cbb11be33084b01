"""Advantage estimators and loss aggregation of the training package, against hand-computed
cases."""

import math

import pytest
import torch

from lambdapo import advantages as adv
from lambdapo.loss import BatchTotals, aggregate, k3_kl, policy_loss, rollout_is_weights
from lambdapo.method import LambdaSettings


def advantages(estimator: str, **settings) -> torch.Tensor:
    return adv.compute_advantages(REWARDS, SCORES, estimator, LambdaSettings(**settings))


REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
SCORES = torch.tensor([[-0.1, -0.5, -0.2, -2.0], [-1.0, -1.0, -1.0, -1.0]])


def test_grpo_by_hand():
    a = advantages("grpo")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # sample std of [1, 0, 0, 1]
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) / torch.tensor([[std + 1e-6],
                                                                                  [1e-6]])
    torch.testing.assert_close(a, expected)


def test_dr_grpo_and_rloo_by_hand():
    d = advantages("dr_grpo")
    torch.testing.assert_close(d[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    r = advantages("rloo")
    # r_0 - mean(0, 0, 1) = 1 - 1/3
    torch.testing.assert_close(r[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.count_nonzero(r[1]) == 0


def test_lambdapo_by_hand_and_beta_zero_is_rloo():
    a = advantages("lambdapo", beta=1.0)
    s = SCORES[0]

    def w(i, j):
        sign = float(torch.sign(REWARDS[0, i] - REWARDS[0, j]))
        return 2 / (1 + math.exp(sign * (s[i] - s[j])))
    expected = [sum((REWARDS[0, i] - REWARDS[0, j]) * w(i, j) for j in range(4) if j != i) / 3
                for i in range(4)]
    torch.testing.assert_close(a[0], torch.tensor(expected, dtype=torch.float32))
    assert torch.count_nonzero(a[1]) == 0
    zero = advantages("lambdapo", beta=0.0)
    torch.testing.assert_close(zero, advantages("rloo"))


def test_estimator_errors():
    with pytest.raises(ValueError, match="adv_estimator"):
        advantages("ppo")
    with pytest.raises(ValueError, match="G=1"):
        adv.compute_advantages(REWARDS[:, :1], SCORES[:, :1], "lambdapo")


def test_sequence_scores():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv.sequence_scores(lp, mask, "mean"), torch.tensor([-1.5, -3.0]))
    torch.testing.assert_close(adv.sequence_scores(lp, mask, "sum"), torch.tensor([-3.0, -3.0]))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", (2.0 + 4.0) / 2),
    ("seq-mean-token-sum-norm", (6 / 8 + 4 / 8) / 2),
])
def test_aggregation_by_hand(mode, expected):
    totals = BatchTotals(tokens=4, sequences=2, max_new_tokens=8)
    assert float(aggregate(PER_TOKEN, MASK, mode, totals)) == pytest.approx(expected)
    # Split into micro-batches, the shares add up to the same loss.
    parts = sum(float(aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], mode, totals)) for i in (0, 1))
    assert parts == pytest.approx(expected)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    totals = BatchTotals(3, 1, 3)
    loss, m = policy_loss(new, old, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.2,
                          agg_mode="token-mean", totals=totals)
    # A > 0: min(rho A, clip(rho) A) = [1.2*2, 0.5*2, 1.1*2]
    assert float(loss.detach()) == pytest.approx(-(2.4 + 1.0 + 2.2) / 3)
    assert m["clipped"] == 1.0 and m["tokens"] == 3.0
    loss.backward()
    # The clipped token passes no gradient; the others pass d(-rho A)/dlogp = -rho A / 3.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5 * 2 / 3, -1.1 * 2 / 3]]))
    loss_neg, _ = policy_loss(new.detach(), old, torch.tensor([-1.0]), mask, clip_low=0.2,
                              clip_high=0.2, agg_mode="token-mean", totals=totals)
    # A < 0: -min(rho A, clip A) = max(rho, clip(rho)) * 1 = [1.5, 0.8, 1.1]
    assert float(loss_neg) == pytest.approx((1.5 + 0.8 + 1.1) / 3)


def test_ratio_at_the_clip_bounds_keeps_its_gradient():
    """The clip interval is closed: with clip_low = clip_high = 0 the on-policy ratio 1 is
    inside it and gets the unclipped gradient -A / tokens (torch 2.14's clamp gives 0 at the
    ends of an empty interval; the fused op's kernels give the full gradient)."""
    ratio = torch.ones(4, dtype=torch.float64, requires_grad=True)
    lp = torch.log(ratio)[None]
    loss, _ = policy_loss(lp, lp.detach(), torch.ones(1, dtype=torch.float64),
                          torch.ones(1, 4, dtype=torch.bool), clip_low=0.0, clip_high=0.0,
                          agg_mode="token-mean",
                          totals=BatchTotals(tokens=4, sequences=1, max_new_tokens=4))
    loss.backward()
    torch.testing.assert_close(ratio.grad, torch.full_like(ratio, -0.25))


def test_k3_kl_and_kl_term():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    d = -0.5
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[math.exp(d) - d - 1, 0.0]]))
    assert float(k3_kl(logp, logp).abs().max()) == 0.0
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = policy_loss(logp, logp, torch.tensor([0.0]), mask, clip_low=0.2, clip_high=0.2,
                          agg_mode="token-mean", totals=BatchTotals(2, 1, 2))
    with_kl, m = policy_loss(logp, logp, torch.tensor([0.0]), mask, clip_low=0.2, clip_high=0.2,
                             agg_mode="token-mean", totals=BatchTotals(2, 1, 2),
                             ref_logprobs=ref, kl_coef=0.5)
    assert float(with_kl - base) == pytest.approx(0.5 * (math.exp(d) - d - 1) / 2)
    assert m["kl"] == pytest.approx(math.exp(d) - d - 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp, torch.tensor([0.0]), mask, clip_low=0.2, clip_high=0.2,
                    agg_mode="token-mean", totals=BatchTotals(2, 1, 2), kl_coef=0.1)


# Trainer (pi_old) and engine (mu) log-probs of two responses, the second one token long.
TRAINER_LP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
ENGINE_LP = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, 9.0, 9.0]])   # 9.0: padding, ignored
IS_MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_token_level_rollout_is_by_hand():
    w, m = rollout_is_weights(TRAINER_LP, ENGINE_LP, IS_MASK, level="token", cap=1.5)
    # exp(pi_old - mu): [e^0.5, e^-1, 1] and [e^1.2]; truncated at 1.5; 1 off the response.
    expected = torch.tensor([[1.5, math.exp(-1.0), 1.0], [1.5, 1.0, 1.0]])
    torch.testing.assert_close(w, expected)
    assert m["mismatch/abs_mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.2) / 4)
    assert m["mismatch/abs_max"] == pytest.approx(1.2)
    assert m["mismatch/is_clipped"] == pytest.approx(2 / 4)
    assert m["mismatch/is_mean"] == pytest.approx((1.5 + math.exp(-1.0) + 1.0 + 1.5) / 4)


def test_sequence_level_rollout_is_uses_the_mean_log_ratio():
    w, m = rollout_is_weights(TRAINER_LP, ENGINE_LP, IS_MASK, level="sequence", cap=1.5)
    first = math.exp((0.5 - 1.0 + 0.0) / 3)    # the mean, not the sum, of the log-ratios
    torch.testing.assert_close(w, torch.tensor([[first] * 3, [1.5, 1.0, 1.0]]))
    assert m["mismatch/is_clipped"] == pytest.approx(1 / 2)   # share of responses
    # A long response whose every token is off by +0.1 keeps weight e^0.1 (a sum would
    # give e^10 and be truncated).
    long = torch.full((1, 100), -1.0)
    w_long, _ = rollout_is_weights(long, long - 0.1, torch.ones(1, 100, dtype=torch.bool),
                                   level="sequence", cap=2.0)
    torch.testing.assert_close(w_long, torch.full((1, 100), math.exp(0.1)))


def test_rollout_is_none_still_measures_and_errors():
    w, m = rollout_is_weights(TRAINER_LP, ENGINE_LP, IS_MASK, level="none", cap=2.0)
    assert w is None and m["mismatch/abs_max"] == pytest.approx(1.2)
    huge = torch.tensor([[100.0]])   # exp would overflow: the weight is the cap
    w, _ = rollout_is_weights(huge, torch.zeros(1, 1), torch.ones(1, 1), level="token", cap=3.0)
    assert float(w) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="rollout_is 'tokens'"):
        rollout_is_weights(TRAINER_LP, ENGINE_LP, IS_MASK, level="tokens", cap=2.0)
    with pytest.raises(ValueError, match="one shape"):
        rollout_is_weights(TRAINER_LP, ENGINE_LP[:, :2], IS_MASK, level="token", cap=2.0)


def test_is_weights_scale_each_tokens_surrogate():
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    weights = torch.tensor([[0.5, 2.0, 1.0]])
    kwargs = dict(clip_low=0.2, clip_high=0.2, agg_mode="token-mean",
                  totals=BatchTotals(3, 1, 3))
    loss, _ = policy_loss(new, torch.zeros(1, 3), torch.tensor([2.0]),
                          torch.ones(1, 3, dtype=torch.bool), is_weights=weights, **kwargs)
    assert float(loss.detach()) == pytest.approx(-(0.5 * 2.4 + 2.0 * 1.0 + 1.0 * 2.2) / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -2.0 * 0.5 * 2 / 3,
                                                        -1.0 * 1.1 * 2 / 3]]))


def test_a_registered_estimator_is_selectable_and_validated(monkeypatch):
    from lambdapo import config as config_lib

    monkeypatch.setattr(adv, "ESTIMATORS", dict(adv.ESTIMATORS))

    @adv.register_estimator("best_of_group")
    def best_of_group(rewards, scores, settings):
        return (rewards == rewards.max(1, keepdim=True).values).float()

    config = config_lib.load_config(None, ["algorithm.adv_estimator=best_of_group"])
    a = adv.compute_advantages(REWARDS, SCORES, config.algorithm.adv_estimator,
                               config_lib.lambda_settings(config))
    torch.testing.assert_close(a, torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]]))
    assert not adv.ESTIMATORS["best_of_group"].uses_scores
    assert "best_of_group" in "\n".join(config_lib.help_lines())
    with pytest.raises(ValueError, match="already registered"):
        adv.register_estimator("grpo")(best_of_group)
    with pytest.raises(ValueError, match="algorithm.adv_estimator"):
        config_lib.load_config(None, ["algorithm.adv_estimator=nonesuch"])


def test_choices_come_from_the_modules_that_interpret_them():
    from lambdapo_ext.advantages import NORMALIZE_MODES

    from lambdapo import config as config_lib
    from lambdapo.loss import AGG_MODES, IS_LEVELS
    from lambdapo.method import SCORE_MODES

    assert config_lib.allowed_values("algorithm.adv_estimator") == tuple(adv.ESTIMATORS)
    assert config_lib.allowed_values("algorithm.loss_agg_mode") == AGG_MODES
    assert config_lib.allowed_values("algorithm.rollout_is") == IS_LEVELS
    help_text = "\n".join(config_lib.help_lines())
    assert " | ".join(SCORE_MODES) in help_text and " | ".join(NORMALIZE_MODES) in help_text
    for normalize in NORMALIZE_MODES:   # every mode the config accepts, the op runs
        advantages("lambdapo", normalize=normalize)
    for key, value in (("algorithm.lambda_score", "max"), ("algorithm.lambda_normalize", "x"),
                       ("algorithm.lambda_beta", "-1"), ("reward.sd_metric", "bleu"),
                       ("reward.lambda_sd", "-0.1"), ("reward.sd_max_n", "0")):
        with pytest.raises(ValueError, match=f"config {key}"):
            config_lib.load_config(None, [f"{key}={value}"])


def _padded_tokens(parts, lengths):
    return sum(len(p) * max(lengths[r] for r in p) for p in parts)


@pytest.mark.parametrize("seed", range(20))
def test_micro_batch_plan_is_an_optimal_partition(seed):
    """Every row once, at most ``limit`` rows each, and no partition into runs of the
    length-sorted rows costs less (checked by enumerating all cut sets)."""
    import itertools

    from lambdapo.batch import MICRO_BATCH_COST_TOKENS, plan_micro_batches

    rng = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 11, (), generator=rng))
    lengths = torch.randint(0, 400, (n,), generator=rng).tolist()
    limit = int(torch.randint(1, n + 1, (), generator=rng))
    rows = list(range(n))
    parts = plan_micro_batches(lengths, rows, limit)
    assert sorted(r for p in parts for r in p) == rows
    assert all(0 < len(p) <= limit for p in parts)

    def cost(parts):
        return sum(len(p) * max(max(lengths[r] for r in p), 1) + MICRO_BATCH_COST_TOKENS
                   for p in parts)
    order = sorted(rows, key=lambda r: (lengths[r], r))
    best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (n,))])
               for k in range(n) for cuts in itertools.combinations(range(1, n), k)
               if all(b - a <= limit for a, b in zip((0,) + cuts, cuts + (n,))))
    assert cost(parts) == best


def test_micro_batch_plan_cuts_padding_where_it_pays():
    from lambdapo.batch import plan_micro_batches

    lengths = [8] * 60 + [600] * 4
    parts = plan_micro_batches(lengths, list(range(64)), 64)
    assert [len(p) for p in parts] == [60, 4]
    assert plan_micro_batches([5, 6, 7], [2, 0], 64) == [[0, 2]]   # only the rows asked


def test_rollout_batch_tensors_and_micro_batches():
    from lambdapo.batch import RolloutBatch
    from lambdapo.rollout.base import Rollout

    prompts = [[1, 5], [1, 6, 7, 8]]
    rollout = Rollout([[9], [10, 11, 2], [], [12, 2]], [[-0.5], [-1, -2, -3], [], [-4, -5]],
                      [False, True, False, True])
    batch = RolloutBatch.from_rollout(prompts, rollout, 2, 0, torch.device("cpu"))
    assert batch.prompt_ids.tolist() == [[0, 0, 1, 5], [1, 6, 7, 8]]
    assert batch.prompt_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.response_ids.tolist() == [[9, 0, 0], [10, 11, 2], [0, 0, 0], [12, 2, 0]]
    assert batch.response_mask.sum(1).tolist() == [1, 3, 0, 2]
    assert batch.engine_logprobs[1].tolist() == [-1, -2, -3]
    micro = batch.micro_batch([3, 0])
    assert micro.prompt_ids.tolist() == [[0, 0, 1, 5], [1, 6, 7, 8]]
    assert micro.prompt_of_row.tolist() == [1, 0] and micro.width == 2
    assert micro.response_ids.tolist() == [[12, 2], [9, 0]]
    only_first = batch.micro_batch([0])
    assert only_first.prompt_ids.tolist() == [[1, 5]] and only_first.width == 1
    with pytest.raises(ValueError, match="group_size"):
        RolloutBatch.from_rollout(prompts, rollout, 3, 0, torch.device("cpu"))
