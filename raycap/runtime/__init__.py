"""The Ray runtime: a controller over rollout, reward and DeepSpeed learner actors (see controller.py)."""
