"""One client scaling its update ×100 (inside max-update-norm): the median keeps the
accuracy of a clean run, FedAvg visibly does not."""

import numpy as np
import pytest
from flwr.app import Array, MessageType

from fedmoe.config import FedMoEConfig
from fedmoe.records import ARRAYS
from simulations.inline import run_inline

SCALE = 100.0


class ScalingClient:
    """The real ClientApp, but partition ``attacker`` sends global + SCALE × its update."""

    def __init__(self, attacker: int):
        from clients.app import app

        self.app, self.attacker = app, attacker

    def __call__(self, msg, context):
        reply = self.app(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN and not reply.has_error()
                and context.node_config["partition-id"] == self.attacker):
            sent, arrays = msg.content[ARRAYS], reply.content[ARRAYS]
            for key in list(arrays.keys()):
                base = sent[key].numpy()
                arrays[key] = Array((base + SCALE * (arrays[key].numpy() - base))
                                    .astype(base.dtype))
        return reply


def _run(tmp_path, name, aggregation, attacker=None):
    config = FedMoEConfig(num_server_rounds=5, aggregation=aggregation,
                          max_update_norm=1e6, run_dir=str(tmp_path / name))
    app = ScalingClient(attacker) if attacker is not None else None
    results = run_inline(config, 6, client_app=app).results
    return results


@pytest.mark.slow
def test_median_resists_one_client_scaling_its_update_fedavg_does_not(tmp_path):
    clean = _run(tmp_path, "clean", "fedavg")
    fedavg = _run(tmp_path, "fedavg", "fedavg", attacker=0)
    median = _run(tmp_path, "median", "median", attacker=0)
    figures = {name: (r["final"]["personalized_accuracy_mean"],
                      r["final"]["global_accuracy_mean"])
               for name, r in (("clean", clean), ("fedavg ×100", fedavg),
                               ("median ×100", median))}
    print("personalised, global-only accuracy:", figures)
    # the attacker's update is ~100× the others' in the report
    norms = [{c["client"]: c["update_norm"] for c in r["clients"] if c["update_norm"]}
             for r in fedavg["rounds"]]
    assert all(n["partition-0"] > 20 * np.median(list(n.values())) for n in norms)
    # DP noise is not seeded: runs spread by several points, and the median may land above
    # the clean run as well as below it (measured: clean 0.712 / 0.822, median ×100 0.756 /
    # 0.769, fedavg ×100 0.099 / 0.099; one run had the median 0.106 off the clean global
    # accuracy), so what is asserted is that the median does not lose what FedAvg loses
    assert figures["median ×100"][0] > figures["clean"][0] - 0.1
    assert figures["median ×100"][1] > figures["clean"][1] - 0.15
    assert figures["fedavg ×100"][1] < figures["clean"][1] - 0.15
    assert figures["fedavg ×100"][0] < figures["median ×100"][0] - 0.05
