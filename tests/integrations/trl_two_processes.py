"""Run by tests/integrations/test_trl.py under torch.distributed.run with 2 CPU processes:
each group of 4 completions is split across the processes (2 per process), so LambdaPO
must gather scores and rewards before the pairwise step. Every process checks that its
advantages are its slice of lambda_advantages over the gathered batch."""

import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))   # tests/: tiny_model

import torch  # noqa: E402
from test_trl import GROUP, config, dataset, digit_reward, sampled_token_logps  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo.integrations.trl import LambdaPOTrainer  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    args = config(out, per_device_train_batch_size=GROUP // 2, semantic_density_weight=0.0,
                  max_steps=2)
    trainer = LambdaPOTrainer(model=model, reward_funcs=[digit_reward], args=args,
                              train_dataset=dataset(), processing_class=tokenizer)
    acc = trainer.accelerator
    assert acc.num_processes == 2, acc.num_processes
    original = trainer._generate_and_score_completions
    checked = []

    def recorded(inputs):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        out = original(inputs)   # no update happens inside: policy is the generating one
        logps = sampled_token_logps(policy, out, trainer.temperature)
        mask = out["completion_mask"].float()
        scores = (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        texts = tokenizer.batch_decode(out["completion_ids"] * out["completion_mask"],
                                       skip_special_tokens=True)
        rewards = torch.tensor(digit_reward(texts))
        all_rewards, all_scores = acc.gather(rewards), acc.gather(scores)
        expected = lambdapo_ext.lambda_advantages(all_rewards.view(-1, GROUP),
                                                  all_scores.view(-1, GROUP), beta=2.0).view(-1)
        local = len(rewards)
        mine = expected[acc.process_index * local:(acc.process_index + 1) * local]
        torch.testing.assert_close(out["advantages"], mine, rtol=1e-4, atol=1e-5)
        # A per-process computation would see half groups: it must differ.
        halves = lambdapo_ext.lambda_advantages(rewards.view(1, -1), scores.view(1, -1), beta=2.0)
        assert not torch.allclose(halves.view(-1), mine) or bool((mine == 0).all())
        checked.append(True)
        return out

    trainer._generate_and_score_completions = recorded
    trainer.train()
    assert len(checked) == 2
    print(f"process {acc.process_index}: advantages match the gathered lambda advantages",
          flush=True)
    acc.wait_for_everyone()
