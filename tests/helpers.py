"""Build Flower messages and contexts the way the engine would, without an engine."""

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.config import FedMoEConfig
from fedmoe.models import model_for
from fedmoe.records import RoundPlan, server_message, to_arrays
from fedmoe.roles import split_state_dict

# Outside an engine Flower has no task identity, which Message() needs: set a dummy one,
# as flwr.simulation.run_simulation does.
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1

SMALL = FedMoEConfig(num_server_rounds=3, sample_rate=0.25, target_epsilon=4.0)


def context(partition_id=0, num_partitions=3, **node_config) -> Context:
    return Context(run_id=1, node_id=10 + partition_id,
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions,
                                **{k.replace("_", "-"): v for k, v in node_config.items()}},
                   state=RecordDict(), run_config={})


def message(kind=MessageType.TRAIN, server_round=1, config=SMALL, sigma=2.0, arrays=None) -> Message:
    if arrays is None:
        arrays = to_arrays(split_state_dict(model_for(config)))
    content = server_message(arrays, RoundPlan(server_round, sigma), config)
    return Message(content, dst_node_id=10, message_type=kind)
