"""lambdapo compare: its statistics against hand-computed values, its methods, and a short
two-seed comparison that is then extended without rerunning what is done."""

import json
import math
from pathlib import Path

import pytest

from lambdapo import cli
from lambdapo.compare import (
    estimate,
    method_overrides,
    parse_method,
    run_comparison,
    summarize,
    t_quantile,
)
from lambdapo.config import load_config


@pytest.mark.parametrize("df, expected", [
    (1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163),
    (29, 2.045229642), (1000, 1.962339081)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-8)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p=1.5"):
        t_quantile(1.5, 3)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.9, 0)


def test_estimate_by_hand():
    # mean 0.3, sample std 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3)
    e = estimate([0.2, 0.3, 0.4])
    assert (e.n, e.mean, e.std) == (3, pytest.approx(0.3), pytest.approx(0.1))
    assert e.ci95 == pytest.approx(4.302652730 * 0.1 / math.sqrt(3))
    assert e.significant  # [0.052, 0.548] excludes 0
    assert not estimate([0.1, -0.1, 0.05]).significant
    one = estimate([0.7])
    assert one.std == 0 and math.isnan(one.ci95) and not one.significant
    with pytest.raises(ValueError):
        estimate([])


def _summary(seed, before, after, seconds=10.0):
    return {"seed": seed, "accuracy_before": before, "accuracy_after": after,
            "seconds": seconds, "steps": 4}


def test_paired_differences_by_hand():
    results = {
        "grpo": [_summary(0, 0.5, 0.7), _summary(1, 0.4, 0.5), _summary(2, 0.5, 0.8)],
        # gains 0.3, 0.2, 0.4 against grpo's 0.2, 0.1, 0.3: paired differences all 0.1
        "lambdapo": [_summary(0, 0.5, 0.8), _summary(1, 0.4, 0.6), _summary(2, 0.5, 0.9)],
        # seed 2 missing: paired on seeds 0 and 1 only (differences 0.0 and 0.2)
        "rloo": [_summary(0, 0.5, 0.7), _summary(1, 0.4, 0.7)],
    }
    table = summarize(results, "grpo")["methods"]
    assert table["grpo"]["gain"]["mean"] == pytest.approx(0.2)
    assert "vs_baseline" not in table["grpo"]
    lam = table["lambdapo"]["vs_baseline"]
    assert lam["mean"] == pytest.approx(0.1) and lam["std"] == pytest.approx(0.0, abs=1e-12)
    assert lam["n"] == 3 and lam["significant"]
    rloo = table["rloo"]["vs_baseline"]
    assert rloo["n"] == 2 and rloo["mean"] == pytest.approx(0.1)
    assert rloo["std"] == pytest.approx(math.sqrt(0.02))
    assert rloo["ci95"] == pytest.approx(12.706204736 * math.sqrt(0.02) / math.sqrt(2))
    assert not rloo["significant"]


def test_methods_are_named_overrides():
    base = load_config(None, ["prompts_per_step=16", "rollout.group_size=8"])
    assert method_overrides("2-grpo", base) == [
        "algorithm.adv_estimator=grpo", "rollout.group_size=2", "prompts_per_step=64"]
    assert "algorithm.lambda_beta=0.5" in method_overrides("lambdapo-b0.5", base)
    assert method_overrides("mine", base, {"mine": ["steps=3"]}) == ["steps=3"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_overrides("nope", base)
    assert parse_method("hot:rollout.temperature=1.2, steps=5") == (
        "hot", ["rollout.temperature=1.2", "steps=5"])
    for bad in ("nocolon", "x:", "x:steps"):
        with pytest.raises(ValueError, match="--method"):
            parse_method(bad)


@pytest.mark.slow
def test_compare_runs_in_parallel_and_extends(tmp_path, capsys):
    from tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=", "answer": str(2 * a),
                                        "solution": f"\\boxed{{{2 * a}}}"}) + "\n"
                            for a in range(10)))
    base = [f"model.path={model}", f"data.dataset={data}", f"data.eval_dataset={data}",
            "data.prompt_field=question", "data.num_eval=4", "steps=2", "prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=6", "eval_samples=1",
            "micro_batch_size=4", "reward.functions=[math_verify]"]
    output = tmp_path / "compare"
    report = run_comparison(None, base, methods=["grpo", "lambdapo"], seeds=2, output=output,
                            jobs=2)
    table = report.read_text()
    assert "| grpo | 2 |" in table and "| lambdapo | 2 |" in table
    progress = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("compare: [")]
    assert len(progress) == 4 and progress[-1].startswith("compare: [4/4] ")
    for line in progress:   # the real log paths of each finished run, which exist
        logs = line.split("(logs: ")[1].rstrip(")").split(", ")
        assert "<" not in line and all(Path(path).is_file() for path in logs), line
    assert (output / "compare.png").stat().st_size > 0
    done = output / "lambdapo" / "seed1" / "summary.json"
    stamp = done.stat().st_mtime_ns
    # Extending to 3 seeds trains only seed 2 of each method.
    assert cli.main(["compare", "--seeds", "3", "--methods", "grpo,lambdapo", "--jobs", "2",
                     "--output", str(output), *base]) == 0
    assert done.stat().st_mtime_ns == stamp
    summary = json.loads((output / "compare.json").read_text())
    assert summary["methods"]["lambdapo"]["seeds"] == [0, 1, 2]
    assert summary["methods"]["lambdapo"]["vs_baseline"]["n"] == 3
    with pytest.raises(ValueError, match="other base settings"):
        run_comparison(None, base + ["optim.lr=0.5"], methods=["grpo"], seeds=1, output=output)
