"""What a run prints per validation: rounded headline numbers, not the raw metrics dict (which stays in
metrics.jsonl)."""
from raycap.runlog import metrics_line


def test_a_validation_line_is_short_and_rounded():
    metrics = {"p_at_1": 0.6559999775886536, "wellformed": 0.998, "faithful": 0.5350000262260437,
               "precision": float("nan"), "recall": 0.41000001, "mean_length": 7.8125, "distinct_2": 0.123456,
               "faithful_2obj": 0.5, "top_caption": "a red circle", "examples": [{"caption": "x"}]}
    assert metrics_line(metrics) == "P@1 0.656, wellformed 0.998, faithful 0.535, recall 0.410, length 7.8"


def test_a_collapse_warning_follows_the_numbers():
    line = metrics_line({"p_at_1": 0.01, "collapse_warning": "captions collapsed: 100% of the images get the same"})
    assert line == "P@1 0.010 (captions collapsed: 100% of the images get the same)"
