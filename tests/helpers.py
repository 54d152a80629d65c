"""Build Flower messages, contexts and a grid the way the engine would, without an engine."""

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.config import FedMoEConfig
from fedmoe.models import model_for
from fedmoe.privacy import plan_client
from fedmoe.records import RoundPlan, server_message, to_arrays
from fedmoe.roles import split_state_dict

# Outside an engine Flower has no task identity, which Message() needs: set a dummy one,
# as flwr.simulation.run_simulation does.
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1

SMALL = FedMoEConfig(num_server_rounds=3, sample_rate=0.25, target_epsilon=4.0, model="moe")


def context(partition_id=0, num_partitions=3, **node_config) -> Context:
    """A node's context; without ``state_dir`` its state goes to the (per-test) temp dir."""
    return Context(run_id=1, node_id=10 + partition_id,
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions,
                                **{k.replace("_", "-"): v for k, v in node_config.items()}},
                   state=RecordDict(), run_config={})


def train_plan(server_round=1, config=SMALL, sigma=2.0, delta=1e-4) -> RoundPlan:
    """A train round plan at σ for a client of ``config`` (q and steps from the config)."""
    plan = plan_client(config.replace(noise_multiplier=sigma), "c", num_train=100, budget=1e9,
                       delta=delta)
    return RoundPlan.for_training(server_round, plan)


def message(kind=MessageType.TRAIN, server_round=1, config=SMALL, sigma=2.0, arrays=None,
            plan=None, dst=10) -> Message:
    if arrays is None:
        arrays = to_arrays(split_state_dict(model_for(config)))
    if plan is None:
        plan = train_plan(server_round, config, sigma) if kind == MessageType.TRAIN \
            else RoundPlan(server_round)
    if kind == MessageType.QUERY:
        arrays = None
    content = server_message(arrays, plan, config)
    return Message(content, dst_node_id=dst, message_type=kind)


class LocalGrid:
    """A Flower Grid that delivers messages to in-process ClientApps, one context per node.

    ``node_configs`` overrides the node config of chosen partition ids.
    """

    def __init__(self, num_clients: int, node_configs: dict | None = None, **node_config):
        from clients.app import app

        self.app = app
        self.contexts = {
            10 + i: context(i, num_clients, **(node_config | (node_configs or {}).get(i, {})))
            for i in range(num_clients)
        }
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies
