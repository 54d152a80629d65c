"""The fedmoe ClientApp: one per data holder, DP-SGD on its own data.

Flower glue only: the work is done by :mod:`fedmoe`. Per train message:

1. read the global ``shared``+``gate`` arrays, the round plan and the run config;
2. charge the client's own privacy ledger for this round and save it (write-ahead),
   refusing with an error reply if the round would exceed the client's budget;
3. rebuild the full model from the global arrays and the client's stored local experts;
4. DP-SGD (Opacus) on all trainable parameters;
5. store the local experts, reply with ``shared``+``gate`` arrays and metrics only.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.state import ClientStore, open_store
from fedmoe.config import FedMoEConfig, NodeSettings
from fedmoe.data import ClientData, load_client_data
from fedmoe.models import model_for
from fedmoe.privacy import BudgetExceededError, new_ledger, round_cost
from fedmoe.records import (
    ARRAYS,
    METRICS,
    EvalReport,
    RoundPlan,
    TrainReport,
    read_server_message,
    to_arrays,
)
from fedmoe.roles import Role, merge_state_dict, split_state_dict
from fedmoe.training import evaluate, train_dp_round

#: Error code of a reply refusing a round the client's budget cannot pay for.
BUDGET_EXCEEDED = 4001

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    node, store, (global_state, plan, config), data = _open(msg, context)

    ledger = store.load_ledger() or new_ledger(config, node.budget(config.target_epsilon))
    try:
        epsilon = ledger.charge(round_cost(config, plan.server_round, plan.noise_multiplier))
    except BudgetExceededError as err:
        return Message(Error(code=BUDGET_EXCEEDED, reason=str(err)), reply_to=msg)
    store.save_ledger(ledger)  # write-ahead: charged before any data is touched

    model = personal_model(config, node, store, global_state)
    result = train_dp_round(
        model,
        data.train,
        epochs=config.local_epochs,
        sample_rate=config.sample_rate,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        learning_rate=config.learning_rate,
        balance_coef=config.balance_coef,
    )
    store.save_local(split_state_dict(model, {Role.LOCAL}))

    report = TrainReport(
        num_examples=len(data.train),
        partition_id=node.partition_id,
        epsilon=epsilon,
        train_loss=result.loss,
        steps=result.steps,
    )
    content = RecordDict({ARRAYS: to_arrays(split_state_dict(model)), METRICS: report.to_record()})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    node, store, (global_state, _, config), data = _open(msg, context)
    model = personal_model(config, node, store, global_state)
    personal = evaluate(model, data.test, use_local=True)
    global_only = evaluate(model, data.test, use_local=False)
    ledger = store.load_ledger()
    report = EvalReport(
        num_examples=personal.num_examples,
        partition_id=node.partition_id,
        personalized_accuracy=personal.accuracy,
        global_accuracy=global_only.accuracy,
        personalized_loss=personal.loss,
        epsilon=ledger.spent() if ledger else 0.0,
    )
    return Message(RecordDict({METRICS: report.to_record()}), reply_to=msg)


def _open(
    msg: Message, context: Context
) -> tuple[NodeSettings, ClientStore, tuple[dict, RoundPlan, FedMoEConfig], ClientData]:
    """What both handlers start from: node settings, state store, the message, own data."""
    node = NodeSettings.from_node_config(context.node_config)
    message = read_server_message(msg.content)
    config = message[2]
    data = load_client_data(config, node.partition_id, node.num_partitions)
    return node, open_store(context, node), message, data


def personal_model(
    config: FedMoEConfig, node: NodeSettings, store: ClientStore, global_state: dict
) -> torch.nn.Module:
    """The run's model with the global shared+gate tensors and this client's local experts.

    A client's first local experts are initialised from a seed of its own partition, so a
    run is reproducible; after that they live only in the client's store.
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003 + node.partition_id)
        model = model_for(config)
    local = store.load_local()
    if local is not None:
        merge_state_dict(model, local, {Role.LOCAL})
    merge_state_dict(model, global_state)
    return model
