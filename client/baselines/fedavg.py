"""The FedAvg client of the first-order baseline: local DP-SGD / DP-Adam (Opacus ghost clipping) per round.

Per ``train`` message the node loads the global trainable tensors, runs ``local_steps`` private steps on its
own partition through :class:`client.baselines.dpsgd.FirstOrderLearner`, and replies with its new trainable tensors
(the clipped, noised local update applied to the global model) and its epsilon. This is what DP-ZO's
few-byte uplink is compared with: a FedAvg reply carries every trainable parameter.

Privacy is example-level per node, as in the DP-ZO federation: the node's own Poisson rate, composed over
every local step it has run (counted in ``context.state``, which Flower keeps per node), with the noise
calibrated for ``rounds x local_steps`` steps.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from seedtune.client.baselines.dpsgd import FirstOrderLearner
from seedtune.client.partition import load_partition
from seedtune.shared.privacy.accounting import PrivacyAccountant
from seedtune.shared.task.config import FederationConfig, RunConfig
from seedtune.shared.task.first_order import METRICS, TRAINABLE, FedAvgConfig, prepare_trainable, trainable_state
from seedtune.shared.task.loading import load_task_model

log = logging.getLogger(__name__)

STATE = "fedavg-node"


_LEARNERS: dict[tuple[int, int], FirstOrderLearner] = {}  # per process: a simulation actor serves many nodes


def _learner(config: FedAvgConfig, partition_id: int, num_partitions: int) -> FirstOrderLearner:
    key = (partition_id, num_partitions)
    if key not in _LEARNERS:
        cfg = config.learner
        task = load_task_model(cfg.model, cfg.task)
        prepare_trainable(task, cfg.lora_rank, cfg.lora_alpha)
        run = RunConfig(model=cfg.model, task=cfg.task, data=cfg.data, federation=FederationConfig(partition="iid"))
        part = load_partition(run, task, partition_id, num_partitions)
        _LEARNERS[key] = FirstOrderLearner(task, part.ids, part.labels, cfg, config.steps_per_node)
    return _LEARNERS[key]


def make_client_app(config: FedAvgConfig) -> ClientApp:
    """A ClientApp bound to one FedAvg configuration (``run_simulation`` passes no run config)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = context.node_config
        learner = _learner(config, int(cfg["partition-id"]), int(cfg["num-partitions"]))
        state = msg.content.array_records[TRAINABLE].to_torch_state_dict()
        learner.task.module.load_state_dict(state, strict=False)
        losses = [learner.step() for _ in range(config.local_steps)]
        # The node's accountant lives in Flower's node state, across rounds and ClientApp processes.
        saved = context.state.config_records.get(STATE)
        accountant = PrivacyAccountant.from_json(str(saved["accountant"])) if saved else PrivacyAccountant()
        accountant.record(learner.noise, learner.sample_rate, len(losses))
        context.state[STATE] = ConfigRecord({"accountant": accountant.to_json()})
        # The loss and the data size depend on the private data: they stay in the node's log, never sent.
        log.info("fedavg node %s: mean loss %.4f over %d local steps (local only)", context.node_id,
                 sum(losses) / len(losses), len(losses))
        metrics: dict[str, Any] = {"epsilon": accountant.epsilon(config.learner.delta)} if learner.noise is not None \
            else {}
        content = RecordDict({TRAINABLE: ArrayRecord(trainable_state(learner.task.module)),
                              METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app
