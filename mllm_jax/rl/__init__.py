"""Alignment: comparison-trained reward models, PPO (rollouts, GAE, KL
control, PPO-ptx), online rounds, and DPO; each a value for the one trainer
or, for PPO, a rollout/learn loop that reuses its step and checkpointer."""
