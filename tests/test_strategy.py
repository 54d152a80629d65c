"""The FedMoE strategy: budget-aware sampling, reply validation, aggregation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedmoe.privacy import epsilon, plan_noise
from fedmoe.records import ARRAYS, METRICS, TrainReport
from server.strategy import FedMoE
from tests.helpers import SMALL, message


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def global_arrays():
    return message().content.array_records[ARRAYS]


def reply_to(sent: Message, arrays: dict, num_examples=10, partition_id=0, **metric_overrides):
    report = TrainReport(num_examples=num_examples, partition_id=partition_id, epsilon=1.0,
                         train_loss=0.5, steps=4).to_record()
    for k, v in metric_overrides.items():
        report[k] = v
    return Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), METRICS: report}), reply_to=sent)


def numpy_state(arrays: ArrayRecord, fill=None):
    return {k: (np.full(a.shape, fill, dtype=np.float32) if fill is not None else a.numpy())
            for k, a in arrays.items()}


def test_sigma_planned_for_the_run_meets_the_budget_exactly_at_the_last_round():
    sigma = plan_noise(SMALL)
    strategy = FedMoE(SMALL, noise_multiplier=sigma)
    grid, arrays = FakeGrid([1, 2, 3]), global_arrays()
    for r in range(1, SMALL.num_server_rounds + 1):
        sent = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
        assert len(sent) == 3
    spent = strategy.ledger(1).spent()
    assert spent <= SMALL.target_epsilon
    assert spent == pytest.approx(epsilon([strategy.round_entry(1).segment] * 3, SMALL.delta))
    # one more round would exceed every budget: nobody is asked
    assert list(strategy.configure_train(4, arrays, ConfigRecord(), grid)) == []


def test_new_client_can_still_be_sampled_when_others_are_spent():
    strategy = FedMoE(SMALL, noise_multiplier=plan_noise(SMALL))
    arrays = global_arrays()
    for r in range(1, 4):
        strategy.configure_train(r, arrays, ConfigRecord(), FakeGrid([1, 2]))
    sent = list(strategy.configure_train(4, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
    assert [m.metadata.dst_node_id for m in sent] == [3]


def test_aggregate_is_weighted_mean_and_drops_bad_replies():
    strategy = FedMoE(SMALL, noise_multiplier=2.0)
    arrays = global_arrays()
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))[0]
    good_a = reply_to(sent, numpy_state(arrays, 1.0), num_examples=30, partition_id=0)
    good_b = reply_to(sent, numpy_state(arrays, 3.0), num_examples=10, partition_id=1)
    local = numpy_state(arrays, 100.0) | {"moe.local_experts.0.fc1.bias": np.zeros(64, np.float32)}
    nan = numpy_state(arrays, 100.0)
    nan["head.bias"][0] = np.nan
    bad_shape = numpy_state(arrays, 100.0) | {"head.bias": np.zeros(3, np.float32)}
    bad_metric = reply_to(sent, numpy_state(arrays, 100.0), partition_id=7)
    bad_metric.content.metric_records[METRICS]["epsilon"] = float("inf")
    replies = [good_a, good_b, reply_to(sent, local, partition_id=4),
               reply_to(sent, nan, partition_id=5), reply_to(sent, bad_shape, partition_id=6),
               bad_metric]

    aggregated, metrics = strategy.aggregate_train(1, replies)
    assert set(aggregated.keys()) == set(arrays.keys())
    for value in aggregated.values():
        np.testing.assert_allclose(value.numpy(), 1.0 * 0.75 + 3.0 * 0.25, rtol=1e-6)
    assert metrics["num-clients"] == 2
    record = strategy.history[-1]
    assert sorted(record.train) == [0, 1]
    reasons = " | ".join(record.rejected)
    assert "extra ['moe.local_experts.0.fc1.bias']" in reasons
    assert "NaN" in reasons and "shape (3,)" in reasons and "finite number" in reasons


def test_noise_multiplier_must_be_positive():
    with pytest.raises(ValueError, match="noise_multiplier"):
        FedMoE(SMALL, noise_multiplier=0.0)
