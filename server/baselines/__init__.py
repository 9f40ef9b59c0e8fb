"""The server half of the FedAvg first-order baseline."""
