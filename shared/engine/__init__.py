"""The zeroth-order engine: seeded directions, trainable sets, perturb/restore/apply on a model, replicas that
follow a ledger, batching."""
