"""Ray dashboard metrics of a run (`ray.util.metrics`, exported to the dashboard's Prometheus endpoint)."""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge

GAUGES = {
    "reward_mean": "mean reward of the step's sampled captions",
    "reward_std": "standard deviation of the step's rewards",
    "train_p_at_1": "fraction of the step's captions that retrieve their image",
    "kl": "KL guard: KL of the policy to the supervised captioner per caption",
    "captions_per_second": "captions through a full RL step per second",
    "learner_seconds": "seconds of the learner's update",
    "weight_sync_seconds": "seconds spent moving weights to the rollouts",
    "policy_lag": "updates between the weights that sampled and the weights being updated",
    "step_seconds": "seconds of a full RL step",
    "logprob_drift": "mean |rollout - learner| log-prob of the sampled tokens (~0 on-policy: decoder and learner "
                     "agree)",
    "sync_changed": "share of decoders whose trainable weights the last weight sync changed (1 expected)",
}


class DashboardMetrics:
    def __init__(self, run_name: str):
        tags = {"run": run_name}
        self.gauges = {k: Gauge(f"raycap_{k}", description=d, tag_keys=("run",)) for k, d in GAUGES.items()}
        for g in self.gauges.values():
            g.set_default_tags(tags)
        self.restarts = Counter("raycap_actor_restarts", description="restarts of rollout/reward actors",
                                tag_keys=("run",))
        self.restarts.set_default_tags(tags)

    def record(self, record: dict) -> None:
        for k, g in self.gauges.items():
            if isinstance(record.get(k), (int, float)):
                g.set(float(record[k]))

    def restarted(self, n: int = 1) -> None:
        self.restarts.inc(n)
